"""lorafleet.replicas: the replica engine (Llama model, paged KV cache, continuous batching, adapter cache).

Runs with torch, safetensors and tokenizers only (no pydantic, Ray or redis). `checkpoint` and
`tokenizer_builder` make seeded demo checkpoints; import them as submodules.
"""

from lorafleet.replicas.config import EngineConfig
from lorafleet.replicas.engine import Engine
from lorafleet.replicas.outputs import RequestMetrics, RequestOutput
from lorafleet.replicas.sampling_params import SamplingParams
from lorafleet.replicas.tokenizer import Tokenizer
from lorafleet.replicas.weights import ModelConfig

__all__ = [
    "Engine",
    "EngineConfig",
    "ModelConfig",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "Tokenizer",
]
