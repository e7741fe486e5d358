"""`lorafleet make-model` and `lorafleet make-adapter`: seeded random checkpoints and adapters."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("make-model")(make_model_cmd)
    app.command("make-adapter")(make_adapter_cmd)


def make_model_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the Hugging Face checkpoint into."),
    preset: str = typer.Option("tiny", help="Model size: tiny (~1M params, tests) or small (~100M, benchmarks)."),
    seed: int = typer.Option(0, help="Random seed of the weights."),
) -> None:
    """Write a seeded random Llama-family checkpoint (config, safetensors, tokenizer) to OUT_DIR."""
    from lorafleet.replicas.checkpoint import PRESETS, make_model

    if preset not in PRESETS:
        choices = ", ".join(PRESETS)
        raise typer.BadParameter(f"unknown preset '{preset}'; choose one of: {choices}", param_hint="--preset")
    out = make_model(out_dir, preset, seed)
    typer.echo(f"wrote {preset} model (seed {seed}) to {out}")


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
