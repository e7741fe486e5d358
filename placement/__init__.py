"""lorafleet.placement"""
