"""The edit-set format and how edits are attached to a live model.

An edit set is a list of low-rank deltas ΔW = U Vᵀ on linear modules of one
base model, saved as one ``.safetensors`` file:

* tensors ``delta.<i>.U`` (d_out × r) and ``delta.<i>.V`` (d_in × r);
* metadata key ``editlens`` holding a JSON manifest: ``format`` and
  ``format_version``, ``base_fingerprint`` (see ``vlm.loading``), ``editor``
  and its ``hyperparameters``, one entry per delta (layer, module path, rank)
  and one ``records`` entry per edit (the request, layer, metrics, timings).

A MultEdit edit is one rank-one column pair (u, v = k); an edit set with n
edits at one layer has one delta of rank n (the columns concatenated), which
is also how it exports to a PEFT LoRA adapter.

Attaching never touches the base weights: a forward hook on each edited
module adds (x V) Uᵀ to its output. Removing the hooks therefore gives back
the base model's outputs bit for bit, and switching between edit sets needs
no copy or reload of the base model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import torch

from vlm.hooks import thread_scoped
from vlm.loading import VLM

FORMAT = "editlens.edit_set"
FORMAT_VERSION = 1
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class EditSetError(ValueError):
    """The file is not a usable edit set (corrupt, malformed, non-finite...)."""


class FingerprintMismatchError(EditSetError):
    """The edit set was made for another base model."""


class Delta(Protocol):
    """Anything that adds a contribution to a linear module's output."""

    module: str

    def contribution(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LowRankDelta:
    """ΔW = U Vᵀ on the linear module at ``module`` (decoder layer ``layer``)."""

    layer: int
    module: str
    U: torch.Tensor  # (d_out, r)
    V: torch.Tensor  # (d_in, r)

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        V = self.V.to(x.device, torch.float32)
        U = self.U.to(x.device, torch.float32)
        return (x.float() @ V) @ U.T

    def dense(self) -> torch.Tensor:
        return self.U.float() @ self.V.float().T


@dataclass
class EditSet:
    """Low-rank deltas plus everything needed to trust and explain them."""

    deltas: list[LowRankDelta]
    base_fingerprint: str
    editor: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_edits(self) -> int:
        return len(self.records)

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_fingerprint": self.base_fingerprint,
            "editor": self.editor,
            "hyperparameters": self.hyperparameters,
            "deltas": [{"layer": d.layer, "module": d.module, "rank": d.rank,
                        "shape": [int(d.U.shape[0]), int(d.V.shape[0])]} for d in self.deltas],
            "records": self.records,
        }

    def merged(self) -> "EditSet":
        """The same edits with the deltas of each module concatenated into one (ranks add up)."""
        by_module: dict[str, list[LowRankDelta]] = {}
        for d in self.deltas:
            by_module.setdefault(d.module, []).append(d)
        deltas = [LowRankDelta(ds[0].layer, m, torch.cat([d.U for d in ds], 1), torch.cat([d.V for d in ds], 1))
                  for m, ds in by_module.items()]
        return EditSet(deltas, self.base_fingerprint, self.editor, dict(self.hyperparameters), list(self.records))

    def extended(self, other: "EditSet") -> "EditSet":
        """This edit set followed by ``other`` (same base model and editor)."""
        if other.base_fingerprint != self.base_fingerprint:
            raise FingerprintMismatchError("cannot combine edit sets made for different base models")
        if other.editor != self.editor:
            raise EditSetError(f"cannot combine a {self.editor} edit set with a {other.editor} one")
        return EditSet(self.deltas + other.deltas, self.base_fingerprint, self.editor,
                       dict(self.hyperparameters), self.records + other.records)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> int:
        """Write the edit set atomically (temp file + rename); returns the size in bytes."""
        check_finite(self.deltas)
        tensors = {}
        for i, d in enumerate(self.deltas):
            tensors[f"delta.{i}.U"] = d.U.detach().float().contiguous().cpu()
            tensors[f"delta.{i}.V"] = d.V.detach().float().contiguous().cpu()
        return write_safetensors(path, tensors, self.manifest())

    @classmethod
    def load(cls, path: str | os.PathLike, vlm: VLM | None = None) -> "EditSet":
        """Read and validate an edit set; with ``vlm``, also check it fits that model."""
        meta, tensors = read_safetensors(path, "edit set")
        edit_set = cls.from_parts(meta, tensors, source=str(path))
        if vlm is not None:
            edit_set.check_compatible(vlm)
        return edit_set

    @classmethod
    def from_parts(cls, meta: dict[str, str], tensors: dict[str, torch.Tensor], source: str = "edit set") -> "EditSet":
        man = read_manifest(meta, source, FORMAT, FORMAT_VERSION, "an EditLens edit set",
                            ("base_fingerprint", "editor", "deltas", "records"))
        deltas = []
        expected = set()
        for i, info in enumerate(man["deltas"]):
            names = (f"delta.{i}.U", f"delta.{i}.V")
            expected.update(names)
            missing = [n for n in names if n not in tensors]
            if missing:
                raise EditSetError(f"{source}: tensors {missing} are missing")
            U, V = tensors[names[0]], tensors[names[1]]
            for n, t in zip(names, (U, V)):
                if t.dtype not in _FLOAT_DTYPES:
                    raise EditSetError(f"{source}: {n} has dtype {t.dtype}; expected a floating point type")
                if t.dim() != 2:
                    raise EditSetError(f"{source}: {n} has shape {tuple(t.shape)}; expected a matrix")
            if U.shape[1] != V.shape[1] or U.shape[1] != info.get("rank"):
                raise EditSetError(f"{source}: delta {i} has U {tuple(U.shape)} and V {tuple(V.shape)}, "
                                   f"but the manifest says rank {info.get('rank')}")
            if [int(U.shape[0]), int(V.shape[0])] != info.get("shape"):
                raise EditSetError(f"{source}: delta {i} has shape {[int(U.shape[0]), int(V.shape[0])]}, "
                                   f"but the manifest says {info.get('shape')}")
            deltas.append(LowRankDelta(int(info["layer"]), str(info["module"]), U.float(), V.float()))
        extra = sorted(set(tensors) - expected)
        if extra:
            raise EditSetError(f"{source}: unexpected tensors {extra[:5]}")
        check_finite(deltas, source)
        return cls(deltas, str(man["base_fingerprint"]), str(man["editor"]),
                   dict(man.get("hyperparameters") or {}), list(man["records"]))

    def check_compatible(self, vlm: VLM) -> None:
        """Raise unless every delta fits a module of ``vlm`` and the base fingerprints agree."""
        if self.base_fingerprint != vlm.fingerprint:
            raise FingerprintMismatchError(
                f"this edit set was made for the base model with fingerprint {self.base_fingerprint}, "
                f"but the loaded model ({vlm.path}) has fingerprint {vlm.fingerprint}")
        for i, d in enumerate(self.deltas):
            try:
                mod = vlm.module(d.module)
            except AttributeError:
                raise EditSetError(f"delta {i} targets {d.module!r}, which this model does not have") from None
            w = getattr(mod, "weight", None)
            if not isinstance(mod, torch.nn.Linear) or w is None:
                raise EditSetError(f"delta {i} targets {d.module!r}, which is not a linear layer")
            if tuple(w.shape) != (d.U.shape[0], d.V.shape[0]):
                raise EditSetError(f"delta {i} has shape {(int(d.U.shape[0]), int(d.V.shape[0]))} but "
                                   f"{d.module} has weight shape {tuple(w.shape)}")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> int:
    """Write ``tensors`` with ``manifest`` as the ``editlens`` metadata, atomically (a temp file, then a
    rename); returns the file's size in bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"editlens": json.dumps(manifest)})
    os.replace(tmp, path)
    return path.stat().st_size


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a safetensors file, or an ``EditSetError`` that says what is wrong."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EditSetError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise EditSetError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None


def read_manifest(meta: dict[str, str], source: str, fmt: str, version: int, what: str,
                  required: Sequence[str]) -> dict[str, Any]:
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
    if man.get("format_version") != version:
        raise EditSetError(f"{source} has format version {man.get('format_version')!r}; "
                           f"this EditLens reads version {version}")
    for key in required:
        if key not in man:
            raise EditSetError(f"{source}: the manifest has no {key!r}")
    return man


def check_finite(deltas: Iterable[LowRankDelta], source: str = "edit set") -> None:
    for i, d in enumerate(deltas):
        for name, t in (("U", d.U), ("V", d.V)):
            if not bool(torch.isfinite(t).all()):
                raise EditSetError(f"{source}: delta {i} ({name}) holds NaN or infinite values")


def file_size_per_edit(size_bytes: int, num_edits: int) -> float:
    return size_bytes / max(1, num_edits)


class AttachedEdits:
    """Forward hooks that add the deltas' contributions; ``remove()`` restores the base model exactly.

    ``others``: further attachments (anything with ``remove()``, e.g. a VisEdit edit set's hooks)
    removed together with the deltas."""

    def __init__(self, vlm: VLM, deltas: Sequence[Delta], others: Sequence[Any] = ()):
        self._others = list(others)
        self._handles = []
        by_module: dict[str, list[Delta]] = {}
        for d in deltas:
            by_module.setdefault(d.module, []).append(d)
        for path, ds in by_module.items():
            mod = vlm.module(path)

            def hook(_mod, args, out, ds=tuple(ds)):
                x = args[0]
                add = ds[0].contribution(x)
                for d in ds[1:]:
                    add = add + d.contribution(x)
                return (out.float() + add).to(out.dtype)

            self._handles.append(mod.register_forward_hook(thread_scoped(hook)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for o in self._others:
            o.remove()
        self._others = []

    def __enter__(self) -> "AttachedEdits":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach(vlm: VLM, *edits: EditSet | Delta | Sequence[Delta] | Any) -> AttachedEdits:
    """Attach edit sets and/or deltas to ``vlm`` (usable as a context manager). Any other edit set
    with an ``attach(vlm)`` method of its own (a VisEdit edit set) is attached through it."""
    deltas: list[Delta] = []
    others: list[Any] = []
    try:
        for e in edits:
            if isinstance(e, EditSet):
                deltas += e.deltas
            elif isinstance(e, (list, tuple)):
                deltas += list(e)
            elif hasattr(e, "attach") and not hasattr(e, "contribution"):
                others.append(e.attach(vlm))
            else:
                deltas.append(e)
    except Exception:
        for o in others:
            o.remove()
        raise
    return AttachedEdits(vlm, deltas, others)


def describe(edit_set: EditSet, size_bytes: int | None = None) -> dict[str, Any]:
    out = {"editor": edit_set.editor, "edits": edit_set.num_edits, "base_fingerprint": edit_set.base_fingerprint,
           "deltas": [{"layer": d.layer, "module": d.module, "rank": d.rank} for d in edit_set.deltas],
           "hyperparameters": edit_set.hyperparameters}
    if size_bytes is not None:
        out["file_bytes"] = size_bytes
        out["bytes_per_edit"] = math.ceil(file_size_per_edit(size_bytes, edit_set.num_edits))
    return out
