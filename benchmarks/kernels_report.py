"""Tables for kernel benchmark results: rich tables for the terminal, markdown for benchmarks/RESULTS.md."""

from __future__ import annotations

from typing import Any

GRID_COLUMNS = ("shape", "T", "rank", "base ms", "base GB/s", "FLoRA x", "FLoRA GB/s", "+delta x",
                "+delta GB/s", "+bmm x", "bmm/FLoRA")
MIXED_COLUMNS = ("shape", "T", "op", "mixed ms", "padded ms", "padded/mixed")


def _grid_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for p in result["grid"]:
        ratio, gbps = p["ratio_to_base"], p["gbps"]
        rows.append((p["shape"], str(p["tokens"]), str(p["rank"]), f"{p['ms']['base']:.3f}",
                     f"{gbps['base']:.1f}", f"{ratio['flora']:.2f}", f"{gbps['flora']:.1f}",
                     f"{ratio['base+delta']:.2f}", f"{gbps['base+delta']:.1f}", f"{ratio['base+bmm']:.2f}",
                     f"{p['flora_speedup_vs_bmm']:.2f}"))
    return rows


def _mixed_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(p["shape"], str(p["tokens"]), p["op"], f"{p['mixed_ms']:.3f}", f"{p['padded_ms']:.3f}",
             f"{p['speedup']:.2f}") for p in result["mixed"]]


def _title(result: dict[str, Any]) -> str:
    torch_version = result.get("hardware", {}).get("torch", "-")  # the header write_result adds
    return (f"{result['device']} · {result['dtype']} · backend {result['backend']} · torch {torch_version}"
            f" · {result['statistic']} of {result['repeats']}")


def format_table(result: dict[str, Any]) -> Any:
    """rich Table of the grid: times as ratios to the base GEMM of the same run, GB/s beside them."""
    from rich.table import Table

    table = Table(title=f"Kernels: {_title(result)}")
    for column in GRID_COLUMNS:
        table.add_column(column, justify="left" if column == "shape" else "right")
    for row in _grid_rows(result):
        table.add_row(*row)
    return table


def format_mixed_table(result: dict[str, Any]) -> Any:
    """rich Table of the mixed-rank batch (half each of result['mixed_ranks']) vs padded to the max."""
    from rich.table import Table

    ranks = result["mixed_ranks"]
    table = Table(title=f"Mixed ranks {ranks[0]}/{ranks[1]} vs padded to {max(ranks)}")
    for column in MIXED_COLUMNS:
        table.add_column(column, justify="left" if column in ("shape", "op") else "right")
    for row in _mixed_rows(result):
        table.add_row(*row)
    return table


def _markdown(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def format_markdown(result: dict[str, Any]) -> str:
    """Both tables as markdown, headed by device, dtype and backend (for benchmarks/RESULTS.md)."""
    ranks = result["mixed_ranks"]
    return "\n\n".join([
        f"{_title(result)}, {result.get('date', '-')}",
        _markdown(GRID_COLUMNS, _grid_rows(result)),
        f"Mixed ranks {ranks[0]}/{ranks[1]} (half each) vs the same batch padded to {max(ranks)}:",
        _markdown(MIXED_COLUMNS, _mixed_rows(result)),
    ])


def print_report(result: dict[str, Any]) -> None:
    """rich tables when rich is installed (the project), plain markdown otherwise (a bare GPU box)."""
    try:
        from rich.console import Console
    except ImportError:
        print(format_markdown(result))
        return
    console = Console()
    console.width = max(console.width, 132)  # the grid table has 11 columns; wrap rather than truncate
    console.print(format_table(result))
    if result["mixed"]:
        console.print(format_mixed_table(result))
