"""`lorafleet adapters ...`: validate adapter directories; push, list, show, versions, rm in the adapter store."""

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


def _open_store(base: Path | None = None):  # -> AdapterStore; kept lazy so `lorafleet --help` stays fast
    from lorafleet.infra.config import load_settings
    from lorafleet.infra.store import AdapterStore

    return AdapterStore.from_settings(load_settings(), base=base)


def _size(num_bytes: int) -> str:
    if num_bytes < 1024:
        return f"{num_bytes} B"
    size = num_bytes / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _when(unix_time: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_time))


def _ranks(record) -> str:
    return ",".join(map(str, record.ranks))


def _table(title: str, *columns: str):  # -> rich Table; ids, sizes and dates never wrap
    from rich import box
    from rich.table import Table

    # Plain kubectl-style layout: half the render time of boxed cells, which matters at thousands of rows.
    table = Table(title=title, box=box.SIMPLE, padding=0)
    for name in columns:
        table.add_column(name, no_wrap=name != "MODULES")
    return table


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


@adapters_app.command("push")
def push_cmd(
    adapter_dir: Path = typer.Argument(..., help="Adapter directory (PEFT LoRA / IA3, or LoRAFleet FLoRA)."),
    adapter_id: str = typer.Option(..., "--id", help="Adapter id: 1-128 characters from [A-Za-z0-9._-]."),
    base: Path | None = typer.Option(None, help="Base model directory to validate against (default: model_dir)."),
    owner: str | None = typer.Option(None, help="Owner recorded with the version (default: the current user)."),
    as_json: bool = typer.Option(False, "--json", help="Print the version record as JSON."),
) -> None:
    """Validate ADAPTER_DIR and store it as a new version of --id; replicas pick it up at once."""
    record = _open_store(base).push(adapter_id, adapter_dir, owner=owner)
    if as_json:
        typer.echo(json.dumps(record.summary()))
        return
    typer.echo(
        f"pushed {record.adapter_id} version {record.version}: {record.peft_type} rank {_ranks(record)} on "
        f"{','.join(record.target_modules)} ({_size(record.num_bytes)}, sha256 {record.sha256[:12]})"
    )


@adapters_app.command("list")
def list_cmd(
    removed: bool = typer.Option(False, "--removed", help="List soft-deleted adapters instead."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
) -> None:
    """Registered adapters with their current version (one Redis read however many there are)."""
    from rich.console import Console

    store = _open_store()
    if removed:
        gone = store.list_removed()
        if as_json:
            typer.echo("\n".join(json.dumps({"adapter_id": k, **v}) for k, v in gone.items()))
            return
        table = _table(_count(len(gone), "removed adapter"), "ID", "LAST VERSION", "REMOVED")
        for adapter_id, info in gone.items():
            table.add_row(adapter_id, str(info["version"]), _when(info["deleted"]))
        Console().print(table)
        return
    records = store.list_current()
    if as_json:
        typer.echo("\n".join(json.dumps(r.summary()) for r in records))
        return
    table = _table(_count(len(records), "adapter"), "ID", "VERSION", "TYPE", "RANK", "MODULES", "SIZE", "CREATED",
                   "OWNER")
    for r in records:
        table.add_row(r.adapter_id, str(r.version), r.peft_type, _ranks(r), ",".join(r.target_modules),
                      _size(r.num_bytes), _when(r.created), r.owner)
    Console().print(table)


@adapters_app.command("show")
def show_cmd(
    adapter_id: str = typer.Argument(..., help="Adapter id."),
    version: int | None = typer.Option(None, help="A past version (default: the current one)."),
    as_json: bool = typer.Option(False, "--json", help="Print the record as JSON."),
) -> None:
    """Everything the registry knows about one adapter version."""
    store = _open_store()
    record = store.current(adapter_id) if version is None else store.get_version(adapter_id, version)
    summary = record.summary()
    if as_json:
        typer.echo(json.dumps(summary))
        return
    lines = {
        "adapter": record.adapter_id, "version": record.version, "type": record.peft_type,
        "ranks": ", ".join(f"{m}={r}" for m, r in summary["module_ranks"].items()),
        "size": f"{_size(record.num_bytes)} ({record.num_bytes} bytes)", "sha256": record.sha256,
        "created": _when(record.created), "owner": record.owner,
    }
    for name, info in summary["files"].items():
        lines[name] = f"sha256 {info['sha256']}, {info['num_bytes']} bytes"
    for key, value in lines.items():
        typer.echo(f"{key:<26} {value}")


@adapters_app.command("versions")
def versions_cmd(
    adapter_id: str = typer.Argument(..., help="Adapter id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
) -> None:
    """Every kept version of an adapter, oldest first; the current one is marked."""
    from rich.console import Console

    from lorafleet.infra.errors import AdapterNotFound

    store = _open_store()
    records = store.versions(adapter_id)
    try:
        current = store.current(adapter_id).version
    except AdapterNotFound:  # soft-deleted: history kept, nothing current
        current = None
    if as_json:
        typer.echo("\n".join(json.dumps({**r.summary(), "is_current": r.version == current}) for r in records))
        return
    title = f"{adapter_id}: {_count(len(records), 'version')}" + ("" if current else " (removed)")
    table = _table(title, "", "VERSION", "TYPE", "RANK", "SIZE", "SHA256", "CREATED", "OWNER")
    for r in records:
        table.add_row("*" if r.version == current else "", str(r.version), r.peft_type, _ranks(r),
                      _size(r.num_bytes), r.sha256[:12], _when(r.created), r.owner)
    Console().print(table)


@adapters_app.command("rm")
def rm_cmd(
    adapter_id: str = typer.Argument(..., help="Adapter id."),
    purge: bool = typer.Option(False, "--purge", help="Also forget every version and delete unshared blobs."),
) -> None:
    """Stop serving an adapter (soft delete: versions and blobs kept); --purge deletes it for good."""
    result = _open_store().remove(adapter_id, purge=purge)
    if purge:
        typer.echo(f"purged {adapter_id}: all versions forgotten, {result['num_blobs_deleted']} blobs deleted")
    else:
        typer.echo(f"removed {adapter_id} (version {result['removed_version']}; soft delete, --purge to delete blobs)")


@adapters_app.command("reindex")
def reindex_cmd() -> None:
    """Rebuild the Redis registry from the object store's manifests (after Redis lost its data)."""
    counts = _open_store().reindex()
    typer.echo(f"reindexed {counts['num_versions']} versions: {counts['live']} adapters live, "
               f"{counts['deleted']} removed")
