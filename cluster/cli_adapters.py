"""`lorafleet adapters ...`: validate adapter directories (and, with the store, push/list/show/rm)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

adapters_app = typer.Typer(help="Validate and manage adapters.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(adapters_app, name="adapters")


@adapters_app.command("validate")
def validate_cmd(
    adapter_dir: Path = typer.Argument(..., help="Adapter directory (PEFT LoRA / IA3, or LoRAFleet FLoRA)."),
    base: Path = typer.Option(..., help="Base model directory to validate shapes against."),
    adapter_id: str | None = typer.Option(None, "--id", help="Also check this adapter id."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Check an adapter against a base model; print a summary, or one error line and exit 2."""
    from lorafleet.infra.adapters import load_adapter_dir, validate_adapter_id
    from lorafleet.infra.base_spec import BaseModelSpec
    from lorafleet.infra.config import load_settings

    settings = load_settings()
    if adapter_id is not None:
        validate_adapter_id(adapter_id)
    spec = BaseModelSpec.from_model_dir(base)
    weights = load_adapter_dir(adapter_dir, spec, max_rank=settings.max_rank, max_bytes=settings.max_adapter_bytes)
    summary = {"adapter_dir": str(adapter_dir), **weights.summary()}
    if as_json:
        typer.echo(json.dumps(summary))
        return
    ranks = ",".join(map(str, summary["ranks"]))
    typer.echo(
        f"ok: {adapter_dir}: {summary['peft_type']} rank {ranks} on {','.join(summary['target_modules'])} "
        f"({summary['num_modules']} modules in {summary['num_layers']} layers, {summary['num_bytes']} bytes)"
    )
