"""`lorafleet keys ...`: add, list and remove the API keys of the Redis hash (`api_keys_from_redis`)."""

from __future__ import annotations

import json

import typer

keys_app = typer.Typer(help="Manage the API keys routers read from Redis (LORAFLEET_API_KEYS_FROM_REDIS=1).",
                       no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")


def _open_keys():  # -> (ApiKeyStore, Settings); kept lazy so `lorafleet --help` stays fast
    from lorafleet.infra.config import load_settings
    from lorafleet.infra.redis_conn import connect
    from lorafleet.router.key_store import ApiKeyStore

    settings = load_settings()
    return ApiKeyStore(connect(settings.redis_url, timeout_s=2.0), settings.redis_prefix), settings


@keys_app.command("add")
def add_cmd(
    adapters: str | None = typer.Option(None, help="Comma-separated adapter ids the key may use ('' = base only)."),
    all_adapters: bool = typer.Option(False, "--all", help="The key may use every adapter."),
    name: str = typer.Option("", help="A label shown by `keys list` (who the key is for)."),
) -> None:
    """Make a new random key: printed once on stdout, stored only as its sha256 digest."""
    if (adapters is None) == (not all_adapters):
        raise typer.BadParameter("give exactly one of --adapters a,b and --all")
    adapter_ids = None if all_adapters else [a.strip() for a in (adapters or "").split(",") if a.strip()]
    store, settings = _open_keys()
    try:
        key, record = store.add(adapter_ids, name=name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--name") from None
    typer.echo(key)
    named = f", name '{record.name}'" if record.name else ""
    typer.echo(f"added API key {record.digest[:12]} (adapters {record.scope()}{named}); it is shown only now",
               err=True)
    if not settings.api_keys_from_redis:
        typer.echo("note: routers read these keys only with LORAFLEET_API_KEYS_FROM_REDIS=1", err=True)


@keys_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON lines (full digests) instead.")) -> None:
    """The stored keys, oldest first: digest prefix, adapters, name, created (never a key)."""
    from rich.console import Console

    from lorafleet.cluster.cli_adapters import _count, _table, _when

    store, _ = _open_keys()
    records, problems = store.load()
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)
    if as_json:
        lines = [json.dumps({"digest": r.digest, "adapters": "*" if r.adapter_ids is None else list(r.adapter_ids),
                             "name": r.name, "created": r.created}) for r in records]
        typer.echo("\n".join(lines))
        return
    table = _table(_count(len(records), "API key"), "DIGEST", "ADAPTERS", "NAME", "CREATED")
    for r in records:
        table.add_row(r.digest[:12], r.scope(), r.name, _when(r.created) if r.created else "")
    Console().print(table)


@keys_app.command("rm")
def rm_cmd(digest_prefix: str = typer.Argument(..., help="The start of a DIGEST from `lorafleet keys list`.")) -> None:
    """Revoke a key: routers refuse it within api_keys_refresh_s."""
    store, settings = _open_keys()
    digest = store.remove(digest_prefix)
    typer.echo(f"removed API key {digest[:12]}; routers refuse it within {settings.api_keys_refresh_s:g} s")
