"""`lorafleet serve`: run the Serve app from a settings YAML, locally or on an existing Ray cluster."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)


def serve_cmd(
    config: Path | None = typer.Option(None, "--config", help="Settings YAML (keys = LORAFLEET_* setting names)."),
    address: str | None = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)."),
) -> None:
    """Serve until Ctrl-C / SIGTERM, then delete the app (and stop the local Ray if this started it)."""
    from lorafleet.cluster.serving import serve_app, stop_on_signals, wait_forever
    from lorafleet.infra.config import load_settings

    settings = load_settings(config)
    with stop_on_signals(), serve_app(settings, address=address) as url:
        typer.echo(f"serving at {url} (model_dir {settings.model_dir}); Ctrl-C to stop")
        wait_forever()
    typer.echo("stopped")
