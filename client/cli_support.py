"""What every ``editlens`` command shares: failing with a message, loading the model, progress bars."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import typer


def console():
    """A rich console on stderr (progress and stage lines; stdout stays for results and --json)."""
    from rich.console import Console

    return Console(stderr=True)


def stage_printer(con) -> Callable[[str], None]:
    """A callback that prints a stage of long work as a bullet line on ``con``."""
    return lambda message: con.print(f"[bold]·[/bold] {message}")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def default_model_dir() -> Path:
    """The embedded world's model folder."""
    from vlm.world.folder import WorldFolder

    return WorldFolder.default(0).model_dir


def load_model(model: Path | None, device: str, dtype: str):
    """The model in ``model`` (default: the embedded world's), or the CLI's error."""
    from vlm import ModelLoadError, load_vlm

    path = model or default_model_dir()
    if model is None and not path.exists():
        fail(
            f"no model given and the embedded default is not built yet ({path}); "
            "run `editlens world build` or pass --model PATH"
        )
    try:
        return load_vlm(path, device=device, dtype=dtype)
    except ModelLoadError as exc:
        fail(str(exc))


def progress_bar(console):
    """A transient progress bar on ``console`` (description, bar, count, info, elapsed)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def world_folder(world: Path | None, seed: int):
    """The built ``WorldFolder`` of ``--world`` (default: the world of ``--seed``; its description, model and
    test edit cases there), or the CLI's error."""
    from vlm.world.folder import WorldFolder, WorldFolderError

    folder = WorldFolder(world) if world is not None else WorldFolder.default(seed)
    try:
        return folder.require(hint="run `editlens world build` (or pass --world PATH)")
    except WorldFolderError as exc:
        fail(str(exc))


def world_and_model(world: Path | None, seed: int, device: str):
    """A built world's folder (the root of ``world_folder``'s ``WorldFolder``, for the functions that take a
    world folder) and its loaded model, or the CLI's error."""
    from vlm import ModelLoadError, load_vlm

    folder = world_folder(world, seed)
    try:
        return folder.root, load_vlm(folder.model_dir, device=device)
    except ModelLoadError as exc:
        fail(str(exc))
