"""LoRAFleet: serve thousands of fine-tuned adapters of one LLM on a Ray Serve cluster."""

__version__ = "0.1.0"
