"""lorafleet.kernels"""
