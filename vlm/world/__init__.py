"""The synthetic factual-VQA world and its tiny LLaVA (the embedded default model).

The names below are imported on first use (PEP 562, as in ``vlm/__init__.py``), so ``vlm.world.folder``
(a world folder's layout, asked by the server and the CLI) loads neither torch nor transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "..home": ("editlens_home",),
    ".build": ("build_world", "load_summary"),
    ".folder": ("WorldFolder", "WorldFolderError", "default_world_dir"),
    ".spec": ("KIND_CONSTRAINT", "RELATIONS", "World", "WorldConfig"),
    ".train": ("WORLD_FAMILIES", "ModelConfig", "TrainConfig"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'vlm.world' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
