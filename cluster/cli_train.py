"""`lorafleet train`: train a LoRA / IA3 (PEFT) or FLoRA (own loop) adapter on a generated task, validate it,
and report held-out exact match of the base model and the adapter."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)


def resolve_base(base: str, models_dir: Path = Path(".lorafleet/models")) -> Path:
    """A model directory, or the name of a pretrained model (converted once under models_dir)."""
    from lorafleet.infra.errors import InvalidModel
    from lorafleet.replicas.pretrained import PRETRAINED

    if base in PRETRAINED:
        from lorafleet.cluster.cli_models import convert_with_progress

        return convert_with_progress(base, models_dir / base, cached=True)
    path = Path(base)
    if not (path / "config.json").is_file():
        raise InvalidModel(f"--base {base}: not a model directory (no config.json) nor one of: {', '.join(PRETRAINED)}")
    return path


def train_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the adapter into (replaced if it exists)."),
    base: str = typer.Option(..., help="Base model directory, or smollm2-135m (converted once, cached)."),
    adapter_type: str = typer.Option("lora", "--type", help="lora, ia3 or flora."),
    rank: int = typer.Option(8, help="Rank (ia3: 1)."),
    task: str = typer.Option(..., help="Task: upper, reverse, persona or sql."),
    steps: int = typer.Option(100, help="Optimizer steps."),
    lr: float | None = typer.Option(None, help="Learning rate (default per type: lora 2e-3, ia3 2e-2, flora 8e-3, "
                                    "the FLoRA paper's)."),
    batch_size: int = typer.Option(8, help="Examples per step (FLoRA paper: 8)."),
    seed: int = typer.Option(0, help="Seed of the data split, the initialisation and the batches."),
    targets: str | None = typer.Option(None, help="Comma-separated target modules (default per type: lora "
                                       "q_proj,v_proj; ia3 k_proj,v_proj,down_proj; flora q_proj,k_proj)."),
    num_layers: int = typer.Option(0, help="Adapt only the last N layers (faster); 0 = every layer."),
    save_dtype: str = typer.Option("float32", help="dtype of the saved tensors: float32, float16 or bfloat16."),
    threads: int | None = typer.Option(None, min=1, help="torch threads (default: torch's)."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Report held-out exact match afterwards."),
) -> None:
    """Train an adapter on a generated task; prints the loss as it goes and the held-out accuracy at the end."""
    from lorafleet.infra.errors import InvalidAdapter
    from lorafleet.training.trainer import TrainConfig

    try:
        config = TrainConfig(adapter_type, task, rank=rank, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                             targets=tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else None,
                             num_layers=num_layers, save_dtype=save_dtype)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    model_dir = resolve_base(base)
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lorafleet.infra.adapters import load_adapter_dir
    from lorafleet.infra.base_spec import BaseModelSpec
    from lorafleet.training.trainer import train

    if threads is not None:
        torch.set_num_threads(threads)
    typer.echo(f"training {adapter_type} rank {config.rank} on task '{task}' over {model_dir} "
               f"(targets {','.join(config.targets or ())}, lr {config.learning_rate:g}, {steps} steps)")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("loss {task.fields[loss]}")) as bar:
        job = bar.add_task("training", total=steps, loss="-")
        result = train(model_dir, out_dir, config,
                       on_step=lambda step, loss: bar.update(job, completed=step + 1, loss=f"{loss:.4f}"))
    first, last = result.losses[0], sum(result.losses[-5:]) / len(result.losses[-5:])
    typer.echo(f"trained {result.num_params:,} parameters in {result.seconds:.0f} s; loss {first:.3f} -> {last:.4f}")
    try:
        summary = load_adapter_dir(out_dir, BaseModelSpec.from_model_dir(model_dir), max_rank=4096).summary()
    except InvalidAdapter as exc:   # what we wrote must load: anything else is a bug worth a loud failure
        raise RuntimeError(f"the trained adapter does not validate: {exc}") from exc
    typer.echo(f"valid {summary['peft_type']} adapter: ranks {summary['ranks']}, {summary['num_modules']} modules, "
               f"{summary['num_bytes']:,} bytes -> {out_dir}")
    if evaluate:
        from lorafleet.training.evaluate import heldout_accuracy

        scores = heldout_accuracy(model_dir, task, {"adapter": out_dir}, seed=seed)
        typer.echo(f"held-out exact match on '{task}': base {scores[None]:.0%}, adapter {scores['adapter']:.0%}")
