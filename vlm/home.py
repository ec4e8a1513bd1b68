"""The EditLens home folder: the one rule for where EditLens keeps what it builds and stores.

``$EDITLENS_HOME`` when set, else ``~/.cache/editlens``; under it ``worlds/`` (the built worlds,
``vlm.world.WorldFolder``), ``registry/`` (the embedded registry's default folder: the server and
the CLI pass it to ``registry.Registry``, which imports nothing of the model stack), ``statistics/``
(preservation statistics of models whose folder is read-only) and ``shapes/`` (the shaped random-weight
models of ``bench diagnostics --shape``). Every place that resolves ``$EDITLENS_HOME`` asks here; this
module imports nothing heavy (no torch), so the CLI can use it for its defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "EDITLENS_HOME"
DEFAULT_HOME = Path("~") / ".cache" / "editlens"


def editlens_home() -> Path:
    """``$EDITLENS_HOME`` (``~`` expanded), default ``~/.cache/editlens``; read on every call, so a changed
    environment applies at once. An empty ``$EDITLENS_HOME`` counts as unset."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def worlds_dir() -> Path:
    """Where the built worlds live by default: ``<home>/worlds``."""
    return editlens_home() / "worlds"


def registry_dir() -> Path:
    """The embedded registry's default folder: ``<home>/registry``."""
    return editlens_home() / "registry"


def statistics_dir() -> Path:
    """Preservation statistics of models whose own folder is read-only: ``<home>/statistics``."""
    return editlens_home() / "statistics"


def shapes_dir() -> Path:
    """Shaped random-weight models (``bench diagnostics --shape``): ``<home>/shapes``."""
    return editlens_home() / "shapes"
