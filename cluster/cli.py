"""The `lorafleet` command line: one typer app; each area registers its commands from its own module."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

import typer

from lorafleet.infra.errors import LoRAFleetError

app = typer.Typer(
    name="lorafleet",
    help="LoRAFleet: serve thousands of adapters of one LLM on a Ray Serve cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that add commands to `app` through `register(app)`; each keeps its heavy imports inside commands.
COMMAND_MODULES = (
    "lorafleet.cluster.cli_models",
    "lorafleet.cluster.cli_adapters",
    "lorafleet.cluster.cli_keys",
    "lorafleet.cluster.cli_bench",
    "lorafleet.cluster.cli_placement",
    "lorafleet.cluster.cli_serve",
    "lorafleet.cluster.cli_loadtest",
    "lorafleet.cluster.cli_train",
    "lorafleet.cluster.demo",
)

EXIT_BAD_INPUT = 2


def _register_all() -> None:
    for name in COMMAND_MODULES:
        module = import_module(name)
        register: Callable[[typer.Typer], None] = module.register
        register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: LoRAFleet errors and bad input become one line on stderr and exit code 2."""
    try:
        # Without standalone mode click returns a command's typer.Exit code instead of exiting.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except LoRAFleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except typer.TyperException as exc:  # usage errors and bad parameters: one line, not click's usage box
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        typer.echo(f"error: {' '.join(message.split())}", err=True)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
