"""``editlens registry ...``: the registry itself, without a server (what a crash can leave, and its repair)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .cli_support import fail
from .options import JSON

registry_app = typer.Typer(help="The adapter registry (MLflow), read directly: consistency after a crash.")


@registry_app.command("check")
def check_cmd(
    registry_dir: Path | None = typer.Option(
        None, help="Registry folder of the embedded registry (default: $EDITLENS_HOME/registry)."
    ),
    registry_uri: str | None = typer.Option(None, help="An MLflow tracking URI instead (e.g. http://mlflow:5000)."),
    repair: bool = typer.Option(False, "--repair", help="Delete orphan runs older than --grace."),
    grace: float = typer.Option(
        600.0, help="Seconds an orphan run is left alone (a younger one may be a registration in flight)."
    ),
    as_json: bool = JSON,
) -> None:
    """Verify every version's files against their checksums and every alias's target, and find the runs a
    registration that died left behind (deleted with --repair). Exits 1 when a version or an alias is bad."""
    from registry import Registry, RegistryError
    from vlm.home import registry_dir as default_registry_dir

    if grace < 0:
        fail("--grace must be >= 0")
    try:
        found = Registry(tracking_uri=registry_uri, data_dir=registry_dir or default_registry_dir()).check_consistency(
            repair, grace
        )
    except RegistryError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(found, indent=1))
    else:
        typer.echo(
            f"{found['versions']} version(s) checked: {len(found['bad_versions'])} bad, "
            f"{len(found['bad_aliases'])} bad alias(es), {len(found['orphan_runs'])} orphan run(s), "
            f"{len(found['deleted_runs'])} deleted"
        )
        for bad in found["bad_versions"]:
            typer.echo(f"  bad: adapter {bad['adapter']} version {bad['version']}: {bad['error']}")
        for bad in found["bad_aliases"]:
            typer.echo(f"  bad alias: adapter {bad['adapter']} {bad['alias']} -> {bad['version']}")
    if found["bad_versions"] or found["bad_aliases"]:
        raise typer.Exit(1)


@registry_app.command("squash")
def squash_cmd(
    adapter: str = typer.Argument(..., help="The adapter."),
    version: int = typer.Argument(..., help="The delta version to store whole."),
    registry_dir: Path | None = typer.Option(
        None, help="Registry folder of the embedded registry (default: $EDITLENS_HOME/registry)."
    ),
    registry_uri: str | None = typer.Option(None, help="An MLflow tracking URI instead (e.g. http://mlflow:5000)."),
    as_json: bool = JSON,
) -> None:
    """Store a delta version whole: a new version with every edit set in full and every edit of its lineage in
    its manifest, made live when VERSION is live. An Edit stores only what it adds to the live version (a
    delta); a long lineage of deltas loads faster from a version stored whole, and its ancestors can then be
    deleted."""
    from registry import Registry, RegistryError
    from server.bundles import BundleError, squash
    from vlm.home import registry_dir as default_registry_dir

    try:
        registry = Registry(tracking_uri=registry_uri, data_dir=registry_dir or default_registry_dir())
        info = squash(registry, adapter, version)
    except (RegistryError, BundleError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(info.to_dict(include_manifest=False), indent=1))
    else:
        typer.echo(
            f"adapter {adapter!r} version {version} stored whole as version {info.version}"
            + (" (live)" if info.is_live else "")
            + f": {info.num_edits} edit(s)"
        )
