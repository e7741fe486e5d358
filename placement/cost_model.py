"""Step-time model of one replica for the simulator: base model + LoRA kernels + adapter fetches.

step_s = step_fixed_s + token_s · T + lora_s + adapter_read_s_per_rank · Σ_{distinct adapters} r
  padded kernels (Punica BGMV / S-LoRA MBGMV: tiles sized to the batch's max rank):
      lora_s = lora_token_rank_s · T · max_rank
  sum-of-ranks kernels (FLoRA / SGMV segments, LoRAFleet's kernels/): lora_s = lora_token_rank_s · Σ_t r_t
fetch_s = fetch_latency_s + bytes / fetch_bytes_per_s   (adapter not resident on the replica); with
  store_bytes_per_s > 0 every replica's fetches also queue, first come first served, on one shared store.
swap_s = swap_latency_s + bytes / pcie_bytes_per_s   (S-LoRA: the adapter is in host memory, copied to the GPU)
T = tokens in the step (prefill tokens of admitted requests + one per running sequence).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

KERNELS = ("padded", "sum")


@dataclass(frozen=True, slots=True)
class StepCostModel:
    """Coefficients in seconds. Defaults: a Llama-7B-like fp16 model on one A100-80GB-class GPU.

    step_fixed_s ≈ reading 13.5 GB of weights at ~2 TB/s; token_s ≈ 14 GFLOP/token at ~175 TFLOP/s;
    adapter_read_s_per_rank ≈ 2 MiB per rank unit (q,k,v,o of 32 layers, d=4096, fp16) at 2 TB/s;
    lora_token_rank_s is calibrated so that, with padded kernels, a rank-8 adapter co-served with a
    rank-128 one sees about the +84% P95 TTFT LoRAServe reports (Sec. III-A5, Fig. 1); see placement/README.md.
    """

    kernel: str = "padded"
    step_fixed_s: float = 0.008
    token_s: float = 0.00008
    lora_token_rank_s: float = 3.6e-7
    adapter_read_s_per_rank: float = 1.0e-6
    fetch_latency_s: float = 0.02
    fetch_bytes_per_s: float = 2.0e9
    store_bytes_per_s: float = 0.0  # aggregate bandwidth of the shared adapter store; 0 = unlimited
    pcie_bytes_per_s: float = 25.0e9  # effective host->GPU copy (PCIe 4.0 x16 is 32 GB/s raw)
    swap_latency_s: float = 0.001  # fixed cost per host->GPU load (allocation, page table, launch)
    max_num_seqs: int = 64
    max_batched_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel model '{self.kernel}'; choose one of: {', '.join(KERNELS)}")
        if min(self.step_fixed_s, self.token_s, self.lora_token_rank_s, self.adapter_read_s_per_rank) < 0:
            raise ValueError("cost coefficients must be >= 0")
        if self.store_bytes_per_s < 0:
            raise ValueError("store_bytes_per_s must be >= 0 (0 = unlimited)")
        if self.pcie_bytes_per_s <= 0 or self.swap_latency_s < 0 or self.fetch_latency_s < 0:
            raise ValueError("need pcie_bytes_per_s > 0, swap_latency_s >= 0 and fetch_latency_s >= 0")
        if self.fetch_bytes_per_s <= 0 or self.max_num_seqs < 1 or self.max_batched_tokens < 1:
            raise ValueError("need fetch_bytes_per_s > 0, max_num_seqs >= 1, max_batched_tokens >= 1")

    def step_time(self, num_tokens: int, max_rank: int, rank_token_sum: int, distinct_rank_sum: int) -> float:
        """Seconds for one step; rank_token_sum = Σ_t r_t over the step's tokens."""
        lora_units = num_tokens * max_rank if self.kernel == "padded" else rank_token_sum
        return (
            self.step_fixed_s
            + self.token_s * num_tokens
            + self.lora_token_rank_s * lora_units
            + self.adapter_read_s_per_rank * distinct_rank_sum
        )

    def fetch_time(self, num_bytes: int) -> float:
        return self.fetch_latency_s + num_bytes / self.fetch_bytes_per_s

    def swap_time(self, num_bytes: int) -> float:
        return self.swap_latency_s + num_bytes / self.pcie_bytes_per_s

    def with_(self, **changes) -> StepCostModel:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, StepCostModel] = {
    "llama-7b-a100": StepCostModel(),
    "llama-7b-a100-sgmv": StepCostModel(kernel="sum"),
}
