"""Tables of the engine benchmark: rich for the terminal, markdown for benchmarks/RESULTS.md."""

from __future__ import annotations

from typing import Any

FP32_BASE = "base model, float32"   # benchmarks.engine.FP32_BASE (this module imports no torch)

COLUMNS = ("run", "adapters", "out tok/s", "total tok/s", "x base", "out tok/CPU-s", "x base (CPU)", "TTFT mean s",
           "TTFT p95 s", "TPOT ms", "GFLOP/s")


def _fmt(value: Any, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    runs = result["runs"]
    base_run = next(r for r in runs if r["name"] == "base model")
    base, base_cpu = base_run["output_tokens_per_s"], base_run.get("output_tokens_per_cpu_s")
    out: list[tuple[str, ...]] = []
    for r in runs:
        if "skipped" in r:
            out.append((r["name"], "—", f"skipped: {r['skipped']}", *("—",) * (len(COLUMNS) - 3)))
            continue
        per_cpu = r.get("output_tokens_per_cpu_s")
        out.append((r["name"], str(r["num_adapters"]), _fmt(r["output_tokens_per_s"]),
                    _fmt(r["total_tokens_per_s"]), _fmt(r["output_tokens_per_s"] / base, 2), _fmt(per_cpu),
                    _fmt(per_cpu / base_cpu if per_cpu and base_cpu else None, 2),
                    _fmt(r.get("ttft_mean_s"), 2), _fmt(r.get("ttft_p95_s"), 2), _fmt(r.get("tpot_mean_ms")),
                    _fmt(r["gflops"])))
    return out


def title(result: dict[str, Any]) -> str:
    hw, spec = result.get("hardware", {}), result["spec"]   # hardware: the header write_result adds
    where = (hw.get("gpu") if result["device"].startswith("cuda") else None) or \
        f"{hw.get('cpu', 'cpu')}, {hw.get('torch_threads', '?')} torch threads"
    return (f"Engine: {where} · {result['dtype']} · torch {hw.get('torch', '-')} · {spec['num_requests']} requests x "
            f"({spec['prompt_tokens']} prompt + {spec['output_tokens']} output) tokens · max_num_seqs "
            f"{spec['max_num_seqs']} · LoRA targets {','.join(spec['targets'])}")


def goals_line(result: dict[str, Any]) -> str:
    g, spec = result["goals"], result["spec"]
    tps = {r["name"]: r["output_tokens_per_s"] for r in result["runs"] if "output_tokens_per_s" in r}
    top = max(spec["adapter_counts"])
    many = tps[f"{top} adapters r{spec['rank']}"] / tps["base model"]
    parts = [f"1 adapter / base = {g['one_adapter_vs_base']:.2f} (goal >= 0.95)",
             f"{top} adapters / base = {many:.2f} (goal >= 0.9)",
             f"{top} adapters / 1 adapter = {g['many_adapters_vs_one']:.2f}"]
    if FP32_BASE in tps:
        parts.append(f"{result['dtype']} base / float32 base = {tps['base model'] / tps[FP32_BASE]:.2f} "
                     "(goal >= 2 in bf16)")
    n = spec["baseline_adapters"]
    if "vs_hf_peft" in g:
        parts.append(f"ours / HF PEFT at {n} adapters = {g['vs_hf_peft']:.2f} (goal >= 5)")
    if "vs_one_adapter_at_a_time" in g:
        parts.append(f"ours / one adapter per batch at {n} adapters = {g['vs_one_adapter_at_a_time']:.2f}")
    return "; ".join(parts)


def vllm_goals_line(result: dict[str, Any]) -> str:
    """Issue 18's goals against vLLM, each as ours / theirs by wall time and (in brackets) by CPU time."""
    spec = result["spec"]
    theirs = {r["name"]: r for r in (result.get("vllm") or {}).get("runs") or []}
    ours = {r["name"]: r for r in result["runs"] if "output_tokens_per_s" in r}
    top, ranks = max(spec["adapter_counts"]), "/".join(map(str, spec["mixed_ranks"]))
    low, high = min(spec["vllm_max_lora_ranks"]), max(spec["vllm_max_lora_ranks"])
    # The base model against vLLM's fastest base run: with LoRA on, vLLM pads even adapter-less rows to its
    # max_lora_rank, so its engine at the lowest rank is the stronger yardstick.
    bases = {rank: theirs[key]["output_tokens_per_s"] for rank in spec["vllm_max_lora_ranks"]
             if (key := f"vLLM max_lora_rank {rank}: base model") in theirs}
    fastest = max(bases, key=lambda rank: bases[rank]) if bases else high
    parts = []
    for name, rank, goal in (("base model", fastest, 1.3), (f"{top} adapters r{spec['rank']}", low, 1.5),
                             (f"{top} adapters r{ranks}", high, 3.0)):
        mine, other = ours.get(name), theirs.get(f"vLLM max_lora_rank {rank}: {name}")
        if mine is None or other is None:
            continue
        wall = mine["output_tokens_per_s"] / other["output_tokens_per_s"]
        a, b = mine.get("output_tokens_per_cpu_s"), other.get("output_tokens_per_cpu_s")
        cpu = f" ({a / b:.2f} by CPU time)" if a and b else ""
        parts.append(f"{name} / vLLM max_lora_rank {rank} = {wall:.2f}{cpu} (goal >= {goal})")
    return "; ".join(parts)


def profile_rows(result: dict[str, Any]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The decode-step profile: one (ms, share) column pair per profiled run, parts in the first run's order."""
    profiles = result.get("decode_profile") or {}
    names = list(profiles)
    header = ("part", *(f"{n}: {c}" for n in names for c in ("ms/step", "share")))
    parts = list(dict.fromkeys(p for n in names for p in profiles[n]["parts_cpu_ms"]))
    out = []
    for part in parts:
        cells = []
        for n in names:
            ms, total = profiles[n]["parts_cpu_ms"].get(part), profiles[n]["step_cpu_ms"]
            cells += [_fmt(ms, 2), "—" if ms is None else f"{100 * ms / total:.1f}%"]
        out.append((part, *cells))
    for key, label in (("step_cpu_ms", "step, CPU time"), ("step_wall_ms", "step, wall time")):
        out.append((label, *(c for n in names for c in (_fmt(profiles[n][key], 2), ""))))
    return header, out


def vllm_rows(result: dict[str, Any]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Ours beside vLLM at each max_lora_rank: tok/s (wall) and ours / theirs by wall time and by CPU time."""
    runs = (result.get("vllm") or {}).get("runs") or []
    ours = {r["name"]: r for r in result["runs"] if "output_tokens_per_s" in r}
    theirs: dict[str, dict[str, dict]] = {}
    for r in runs:
        rank, _, name = r["name"].removeprefix("vLLM max_lora_rank ").partition(": ")
        theirs.setdefault(rank, {})[name] = r
    header = ("run", "LoRAFleet out tok/s", *(c for rank in theirs for c in (
        f"vLLM r{rank}", f"ours / r{rank}", f"ours / r{rank} (CPU)")))
    out = []
    for name, mine in ours.items():
        cells = []
        for by_name in theirs.values():
            other = by_name.get(name)
            if other is None:
                cells += ["—"] * 3
                continue
            a, b = mine.get("output_tokens_per_cpu_s"), other.get("output_tokens_per_cpu_s")
            cells += [_fmt(other["output_tokens_per_s"]),
                      f"{mine['output_tokens_per_s'] / other['output_tokens_per_s']:.2f}x",
                      f"{a / b:.2f}x" if a and b else "—"]
        if any(c != "—" for c in cells):
            out.append((name, _fmt(mine["output_tokens_per_s"]), *cells))
    return header, out


def _markdown_table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def format_markdown(result: dict[str, Any]) -> str:
    lines = [f"{title(result)}, {result.get('date', '-')}", "", *_markdown_table(COLUMNS, rows(result)), "",
             goals_line(result)]
    vllm = result.get("vllm") or {}
    if vllm.get("runs"):
        lines += ["", f"vLLM {vllm.get('version', '?')} on the same workloads:", "",
                  *_markdown_table(*vllm_rows(result)), "", vllm_goals_line(result)]
    if vllm.get("skipped"):
        lines += ["", f"vLLM runs skipped: {'; '.join(vllm['skipped'])}"]
    if result.get("decode_profile"):
        first = next(iter(result["decode_profile"].values()))
        lines += ["", f"Decode step of {first['num_seqs']} sequences, thread CPU time per part, mean of "
                      f"{first['num_steps']} steps:", "", *_markdown_table(*profile_rows(result))]
    return "\n".join(lines)


def print_report(result: dict[str, Any]) -> None:
    """rich table when rich is installed (the project), plain markdown otherwise (a bare GPU box)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_markdown(result))
        return
    table = Table(title=title(result))
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in rows(result):
        table.add_row(*row)
    console = Console(width=max(150, Console().width))
    console.print(table)
    console.print(goals_line(result))
    if vllm_line := vllm_goals_line(result):
        console.print(vllm_line)
    for title_text, (header, body) in (("vLLM", vllm_rows(result)), ("decode step, CPU ms", profile_rows(result))):
        if body:
            extra = Table(title=title_text)
            for column in header:
                extra.add_column(column, justify="left" if column in ("run", "part") else "right")
            for row in body:
                extra.add_row(*row)
            console.print(extra)
