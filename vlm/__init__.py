"""Model access: loading LLaVA-family checkpoints, prompt encoding with token
spans, answer scoring, batched activation patching, and (in ``vlm.world``)
the synthetic world with its tiny model.

Nothing in this package knows about gRPC or MLflow. The names below are
imported on first use (PEP 562), so ``import vlm.options`` (the CLI builds
its flags from it) does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    ".architecture": ("ARCHITECTURES", "ArchitectureMap", "architecture_for"),
    ".errors": ("ConstraintNotFoundError", "ImageDecodeError", "ModelLoadError", "PromptError", "VLMError"),
    ".images": ("load_image",),
    ".loading": ("VLM", "fingerprint_folder", "load_vlm"),
    ".patching": ("Knockout", "Patch", "PatchedRun", "run_patched"),
    ".prompts": ("EncodedPrompt", "collate", "encode"),
    ".scoring": ("AnswerScore", "ask", "generate", "score_answers", "score_batch"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'vlm' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
