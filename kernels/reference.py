"""Per-token loop references (the spec): float64 math, one token at a time, no grouping or fusion."""

from __future__ import annotations

import torch


def flora_linear_reference(x: torch.Tensor, weight: torch.Tensor, in_rows: torch.Tensor,
                           out_rows: torch.Tensor, token_start: torch.Tensor,
                           token_rank: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{j<r} out_rows[s+j] o ((in_rows[s+j] o x_t) W^T), or x_t W^T when r = 0 (FLoRA eq. 5).

    x [T, d_in], weight [d_out, d_in], in_rows [P, d_in], out_rows [P, d_out], token_* [T] ints.
    Computes in float64 and returns [T, d_out] in x.dtype.
    """
    w = weight.double()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64, device=x.device)
    for t, (s, r) in enumerate(zip(token_start.tolist(), token_rank.tolist(), strict=True)):
        x_t = x[t].double()
        if r == 0:
            y[t] = w @ x_t
            continue
        a = in_rows[s:s + r].double()   # [r, d_in]: rows of B^T in FLoRA's notation
        b = out_rows[s:s + r].double()  # [r, d_out]: rows of A
        y[t] = (((a * x_t) @ w.T) * b).sum(0)
    return y.to(x.dtype)


def lora_delta_reference(x: torch.Tensor, in_rows: torch.Tensor, out_rows: torch.Tensor,
                         token_start: torch.Tensor, token_rank: torch.Tensor,
                         token_scale: torch.Tensor) -> torch.Tensor:
    """delta_t = scale_t * sum_{j<r} (x_t . in_rows[s+j]) out_rows[s+j]; zero when r = 0.

    x [T, d_in], in_rows [P, d_in], out_rows [P, d_out], token_start/token_rank [T] ints,
    token_scale [T] floats. Computes in float64 and returns [T, d_out] in x.dtype.
    """
    delta = torch.zeros(x.shape[0], out_rows.shape[1], dtype=torch.float64, device=x.device)
    rows = zip(token_start.tolist(), token_rank.tolist(), token_scale.tolist(), strict=True)
    for t, (s, r, scale) in enumerate(rows):
        if r == 0:
            continue
        shrink = in_rows[s:s + r].double() @ x[t].double()            # [r]
        delta[t] = scale * (shrink @ out_rows[s:s + r].double())      # [d_out]
    return delta.to(x.dtype)
