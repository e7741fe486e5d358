"""Tables of the engine benchmark: rich for the terminal, markdown for benchmarks/RESULTS.md."""

from __future__ import annotations

from typing import Any

COLUMNS = ("run", "adapters", "out tok/s", "total tok/s", "x base", "TTFT mean s", "TTFT p95 s", "TPOT ms",
           "GFLOP/s")


def _fmt(value: Any, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    runs = result["runs"]
    base = next(r for r in runs if r["name"] == "base model")["output_tokens_per_s"]
    out: list[tuple[str, ...]] = []
    for r in runs:
        if "skipped" in r:
            out.append((r["name"], "—", f"skipped: {r['skipped']}", *("—",) * 6))
            continue
        out.append((r["name"], str(r["num_adapters"]), _fmt(r["output_tokens_per_s"]),
                    _fmt(r["total_tokens_per_s"]), _fmt(r["output_tokens_per_s"] / base, 2),
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
    parts = [f"1 adapter / base = {g['one_adapter_vs_base']:.2f} (goal >= 0.9)",
             f"{max(spec['adapter_counts'])} adapters / 1 adapter = {g['many_adapters_vs_one']:.2f} (goal >= 0.9)"]
    n = spec["baseline_adapters"]
    if "vs_hf_peft" in g:
        parts.append(f"ours / HF PEFT at {n} adapters = {g['vs_hf_peft']:.2f} (goal >= 5)")
    if "vs_one_adapter_at_a_time" in g:
        parts.append(f"ours / one adapter per batch at {n} adapters = {g['vs_one_adapter_at_a_time']:.2f}")
    return "; ".join(parts)


def format_markdown(result: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(result)]
    return "\n".join([f"{title(result)}, {result.get('date', '-')}", "", *lines, "", goals_line(result)])


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
