"""AdapterLinear: one fused GEMM over several modules (the CPU path) with each module's LoRA / FLoRA tokens on its
own columns, against the float64 per-module reference; and one module per GEMM (the GPU path) alike."""

from __future__ import annotations

import pytest
import torch

from lorafleet.kernels import flora_linear_reference, lora_delta_reference, plan_adapter_batch
from lorafleet.kernels.base_linear import prepack_dtypes
from lorafleet.replicas.adapter_batch import AdapterBatch
from lorafleet.replicas.adapter_linear import AdapterLinear

D_IN, D_OUTS, POOL_ROWS = 48, (40, 24, 24), 64   # q, k, v of a small GQA layer
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2}
# (kind per module) for the three modules: what each module's adapters do in the step
CASES = {
    "base only": (None, None, None),
    "lora on q and v": ("lora", None, "lora"),
    "flora on k, lora on q": ("lora", "flora", None),
    "flora everywhere": ("flora", "flora", "flora"),
    "both kinds on every module": ("both", "both", "both"),
}


def _module_plans(kind: str | None, slot: torch.Tensor, gen: torch.Generator):
    """(lora plan args, flora plan args) for tokens whose adapter slot is slot[t] (-1 = base)."""
    if kind is None:
        return None, None
    starts = torch.tensor([0, 8, 24, 40])          # four adapters' rows in the pool
    ranks = torch.tensor([8, 16, 16, 4])
    scales = torch.rand(4, generator=gen) + 0.5
    is_flora = {"lora": [False] * 4, "flora": [True] * 4, "both": [False, True, False, True]}[kind]
    plans = []
    for want in (False, True):
        use = (slot >= 0) & torch.tensor([is_flora[s] == want if s >= 0 else False for s in slot.tolist()])
        if not bool(use.any()):
            plans.append(None)
            continue
        s = slot.clamp_min(0)
        plans.append((starts[s], ranks[s] * use, None if want else scales[s]))
    return plans[0], plans[1]


def _reference(x, weights, in_rows, out_rows, plans) -> torch.Tensor:
    cols = []
    for w, a, b, (lora, flora) in zip(weights, in_rows, out_rows, plans, strict=True):
        wide = [t.double() for t in (x, w, a, b)]
        y = wide[0] @ wide[1].T if flora is None else flora_linear_reference(*wide, flora[0], flora[1])
        if lora is not None:
            y = y + lora_delta_reference(wide[0], wide[2], wide[3], *lora)
        cols.append(y)
    return torch.cat(cols, dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_fused", [True, False], ids=["fused", "per-module"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_matches_the_per_module_reference(dtype, is_fused, case, num_tokens):
    gen = torch.Generator().manual_seed(num_tokens)
    weights = [torch.randn(d, D_IN, generator=gen).to(dtype) / D_IN ** 0.5 for d in D_OUTS]
    in_rows = [torch.randn(POOL_ROWS, D_IN, generator=gen).to(dtype) for _ in D_OUTS]
    out_rows = [(torch.randn(POOL_ROWS, d, generator=gen) * 0.1).to(dtype) for d in D_OUTS]
    biases = [None, torch.randn(D_OUTS[1], generator=gen).to(dtype), None]    # one module with a bias
    x = torch.randn(num_tokens, D_IN, generator=gen).to(dtype)
    slot = torch.randint(-1, 4, (num_tokens,), generator=gen)
    plans = [_module_plans(kind, slot, gen) for kind in CASES[case]]
    batch = AdapterBatch(lora=[None if lo is None else plan_adapter_batch(*lo) for lo, _ in plans],
                         flora=[None if fl is None else plan_adapter_batch(*fl) for _, fl in plans], num_plans=0)
    expected = _reference(x, weights, in_rows, out_rows, plans)
    expected[:, D_OUTS[0]:sum(D_OUTS[:2])] += biases[1].double()
    prepack = is_fused and dtype in prepack_dtypes()
    if is_fused:
        linears = [AdapterLinear(weights, biases, in_rows, out_rows, [0, 1, 2], "torch", prepack=prepack)]
    else:
        linears = [AdapterLinear([w], [b], [a], [o], [i], "torch")
                   for i, (w, b, a, o) in enumerate(zip(weights, biases, in_rows, out_rows, strict=True))]
    y = torch.cat([linear(x, batch) for linear in linears], dim=1)
    error = (y.double() - expected).abs().max() / expected.abs().max()
    assert error <= REL_TOL[dtype], f"relative error {float(error):.2e}"
    parts = [part for linear in linears for part in linear.split(linear(x, batch))]
    assert [p.shape[1] for p in parts] == list(D_OUTS)


def test_unadaptable_modules_drop_the_plain_weight_once_prepacked():
    if torch.float32 not in prepack_dtypes():
        pytest.skip("no oneDNN")
    weights = [torch.randn(8, 16), torch.randn(4, 16)]
    no_rows = [torch.zeros(0, 16), torch.zeros(0, 16)]
    linear = AdapterLinear(weights, [None, None], no_rows, [torch.zeros(0, 8), torch.zeros(0, 4)], [0, 1],
                           prepack=True)
    assert linear.base.weight is None and all(m.weight is None for m in linear.modules)
    x = torch.randn(3, 16)
    torch.testing.assert_close(linear(x, None), x @ torch.cat(weights).T)
