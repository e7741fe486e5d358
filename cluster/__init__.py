"""lorafleet.cluster"""
