"""Tensor ops for batches that mix many adapters: FLoRA linear, SGMV LoRA delta, the bmm baseline; the base GEMM."""

from .base_linear import BaseLinear, can_prepack
from .ops import KernelBackend, flora_linear, lora_bmm, lora_delta, select_backend
from .plan import AdapterBatchPlan, RankGroup, Segment, plan_adapter_batch
from .reference import flora_linear_reference, lora_delta_reference
from .validation import KernelArgumentError

__all__ = [
    "AdapterBatchPlan",
    "BaseLinear",
    "KernelArgumentError",
    "KernelBackend",
    "RankGroup",
    "Segment",
    "can_prepack",
    "flora_linear",
    "flora_linear_reference",
    "lora_bmm",
    "lora_delta",
    "lora_delta_reference",
    "plan_adapter_batch",
    "select_backend",
]
