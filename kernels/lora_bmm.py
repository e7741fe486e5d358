"""The torch.bmm multi-adapter LoRA baseline of the FLoRA paper (appendix A.2), kept for benchmarks."""

from __future__ import annotations

import torch

from .plan import AdapterBatchPlan


def lora_bmm_torch(x: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor, plan: AdapterBatchPlan,
                   out: torch.Tensor) -> torch.Tensor:
    """out[t] = scale_t * bmm(bmm(x_t, adapter_b[t]), adapter_a[t]), every adapter padded to max rank R.

    Per token it gathers adapter_b [d_in, R] and adapter_a [R, d_out] (rows past the token's rank are
    zero), as a serving system that stacks per-example adapters would, then runs the paper's two bmm
    calls. Cost is T x R x (d_in + d_out) whatever the real ranks: the padding this project avoids.
    """
    num_rank = plan.max_rank
    if num_rank == 0:
        return out.zero_()
    j = torch.arange(num_rank, device=x.device)
    rank = plan.token_rank.to(torch.int64)
    valid = (j < rank[:, None]).to(x.dtype)                                       # [T, R]
    rows = (plan.token_start.to(torch.int64)[:, None] + j).clamp_(max=in_rows.shape[0] - 1)
    adapter_b = (in_rows[rows] * valid[:, :, None]).transpose(1, 2)                # [T, d_in, R]
    adapter_a = out_rows[rows] * valid[:, :, None]                                 # [T, R, d_out]
    hidden = torch.bmm(x.unsqueeze(1), adapter_b)                                  # [T, 1, R]
    adapters_out = torch.bmm(hidden, adapter_a).squeeze(1)                         # [T, d_out]
    return torch.mul(adapters_out, plan.token_scale.to(x.dtype)[:, None], out=out)
