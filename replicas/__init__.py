"""lorafleet.replicas"""
