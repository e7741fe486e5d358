"""lorafleet.loadtests"""
