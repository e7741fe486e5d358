"""lorafleet.router"""
