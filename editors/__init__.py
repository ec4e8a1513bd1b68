"""Knowledge editors (MultEdit, FT-L, VisEdit), their edit-set formats, the editor registry and the
edit metrics.

The editor registry (``editors.registry``) knows the built-in editors —
``multedit`` (``editors.multedit``), ``ft`` (``editors.finetune``) and
``visedit`` (``editors.visedit``) — each registered once by its own module,
which the registry imports on its first lookup. Depends on ``vlm`` and on
``diagnostics`` (the causal trace that chooses MultEdit's layer, the
attributions VisEdit trains and chooses its layer with); knows nothing about
gRPC or MLflow. Importing ``editors`` or ``editors.configs`` loads no torch.
"""

from __future__ import annotations

import importlib

_REGISTRY_NAMES = (
    "DEFAULT_EDITOR",
    "EditContext",
    "EditorSpec",
    "EditorTrainer",
    "editor_names",
    "get_editor",
    "layer_rule",
    "register_editor",
    "trained_editor",
    "unregister_editor",
)
__all__ = list(_REGISTRY_NAMES)


def __getattr__(name: str):
    if name in _REGISTRY_NAMES:
        return getattr(importlib.import_module(".registry", __name__), name)
    raise AttributeError(f"module 'editors' has no attribute {name!r}")
