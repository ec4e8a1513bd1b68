"""What every edit-set file format shares: safetensors with a JSON manifest, and its errors.

An edit set is one ``.safetensors`` file (no pickle anywhere): its tensors and,
in the metadata key ``editlens``, a JSON manifest that names the format and its
version, the base model's fingerprint (``vlm.loading``), the editor and one
record per edit. Each format (``editors.edit_set`` for low-rank deltas,
``editors.finetune`` for dense ones, ``editors.visedit.edit_set`` for VisEdit)
reads and writes through these functions, so they all validate alike and fail
with an ``EditSetError`` that says what is wrong.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class EditSetError(ValueError):
    """The file is not a usable edit set (corrupt, malformed, non-finite...)."""


class FingerprintMismatchError(EditSetError):
    """The edit set was made for another base model."""


class IncompatibleEditSetError(EditSetError):
    """Two edit sets cannot be combined (another editor, another trained adapter)."""


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> int:
    """Write ``tensors`` with ``manifest`` as the ``editlens`` metadata, atomically (a temp file, then a
    rename); returns the file's size in bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # unique: writers may race
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"editlens": json.dumps(manifest)})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a safetensors file, or an ``EditSetError`` that says what is wrong."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise EditSetError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise EditSetError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None


def read_manifest(
    meta: dict[str, str], source: str, fmt: str, version: int | Sequence[int], what: str, required: Sequence[str]
) -> dict[str, Any]:
    """The ``editlens`` manifest of a file's metadata, checked for its format, version and ``required`` keys;
    an ``EditSetError`` naming ``source`` and what is wrong otherwise."""
    if "editlens" not in meta:
        raise EditSetError(f"{source} has no EditLens manifest: it is not an edit set")
    try:
        man = json.loads(meta["editlens"])
    except json.JSONDecodeError as exc:
        raise EditSetError(f"{source}: the manifest is not valid JSON ({exc})") from None
    if not isinstance(man, dict) or man.get("format") != fmt:
        raise EditSetError(f"{source} is not {what} (format {man.get('format') if isinstance(man, dict) else None!r})")
    versions = (version,) if isinstance(version, int) else tuple(version)
    if man.get("format_version") not in versions:
        raise EditSetError(
            f"{source} has format version {man.get('format_version')!r}; this EditLens reads version "
            + " or ".join(str(v) for v in versions)
        )
    for key in required:
        if key not in man:
            raise EditSetError(f"{source}: the manifest has no {key!r}")
    return man


def read_manifest_format(path: str | os.PathLike) -> tuple[str | None, str]:
    """The ``format`` and ``editor`` an edit-set file's manifest names (an ``EditSetError`` if it has none)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise EditSetError(f"edit set not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise EditSetError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    try:
        man = json.loads(meta.get("editlens", "null"))
    except json.JSONDecodeError:
        man = None
    if not isinstance(man, dict):
        raise EditSetError(f"{path} has no EditLens manifest: it is not an edit set")
    return man.get("format"), str(man.get("editor") or "unknown")


def check_tensor(t: torch.Tensor, name: str, source: str, dim: int | None = None) -> torch.Tensor:
    """``t`` as float32 after checking that it is a finite floating-point tensor (of ``dim`` dimensions)."""
    if t.dtype not in FLOAT_DTYPES:
        raise EditSetError(f"{source}: {name} has dtype {t.dtype}; expected a floating point type")
    if dim is not None and t.dim() != dim:
        raise EditSetError(f"{source}: {name} has shape {tuple(t.shape)}; expected {dim} dimensions")
    if not bool(torch.isfinite(t).all()):
        raise EditSetError(f"{source}: {name} holds NaN or infinite values")
    return t.float()


def check_no_extra(tensors: dict[str, torch.Tensor], expected: set[str], source: str) -> None:
    """Raise ``EditSetError`` if the file holds tensors its manifest does not account for."""
    extra = sorted(set(tensors) - expected)
    if extra:
        raise EditSetError(f"{source}: unexpected tensors {extra[:5]}")


def check_fingerprint(edit_set_fingerprint: str, vlm, what: str) -> None:
    """Raise ``FingerprintMismatchError`` unless ``what`` was made for the loaded model."""
    if edit_set_fingerprint != vlm.fingerprint:
        raise FingerprintMismatchError(
            f"{what} was made for the base model with fingerprint {edit_set_fingerprint}, "
            f"but the loaded model ({vlm.path}) has fingerprint {vlm.fingerprint}"
        )
