"""MultEdit's edit-set format (low-rank deltas), and how any edits are attached to a live model.

An edit set is a list of low-rank deltas ΔW = U Vᵀ on linear modules of one
base model, saved as one ``.safetensors`` file (``editors.files``):

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
no copy or reload of the base model. ``attach(vlm, *edits)`` attaches any
number of edit sets (of any editor) and delta lists at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from vlm.hooks import Hooks, Rows
from vlm.loading import VLM

from .base import EditSetBase
from .files import (
    EditSetError,
    FingerprintMismatchError,
    IncompatibleEditSetError,
    check_fingerprint,
    check_no_extra,
    check_tensor,
    read_manifest,
    read_safetensors,
    write_safetensors,
)

FORMAT = "editlens.edit_set"
FORMAT_VERSION = 1


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
    K: torch.Tensor | None = None  # (d_in, r): the edits' keys where V is not the key itself (AlphaEdit)

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        V = self.V.to(x.device, torch.float32)
        U = self.U.to(x.device, torch.float32)
        return (x.float() @ V) @ U.T


@dataclass
class EditSet(EditSetBase):
    """Low-rank deltas plus everything needed to trust and explain them."""

    deltas: list[LowRankDelta]
    base_fingerprint: str
    editor: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_fingerprint": self.base_fingerprint,
            "editor": self.editor,
            "hyperparameters": self.hyperparameters,
            "deltas": [
                {
                    "layer": d.layer,
                    "module": d.module,
                    "rank": d.rank,
                    "shape": [int(d.U.shape[0]), int(d.V.shape[0])],
                    **({"keys": True} if d.K is not None else {}),
                }
                for d in self.deltas
            ],
            "records": self.records,
        }

    def merged(self) -> EditSet:
        """The same edits with the deltas of each module concatenated into one (ranks add up)."""
        by_module: dict[str, list[LowRankDelta]] = {}
        for d in self.deltas:
            by_module.setdefault(d.module, []).append(d)
        deltas = [
            LowRankDelta(
                ds[0].layer,
                m,
                torch.cat([d.U for d in ds], 1),
                torch.cat([d.V for d in ds], 1),
                torch.cat([d.K for d in ds], 1) if all(d.K is not None for d in ds) else None,
            )
            for m, ds in by_module.items()
        ]
        return EditSet(deltas, self.base_fingerprint, self.editor, dict(self.hyperparameters), list(self.records))

    def extended(self, other: EditSet) -> EditSet:
        """This edit set followed by ``other`` (same base model and editor)."""
        if other.base_fingerprint != self.base_fingerprint:
            raise FingerprintMismatchError("cannot combine edit sets made for different base models")
        if other.editor != self.editor:
            raise IncompatibleEditSetError(f"cannot combine a {self.editor} edit set with a {other.editor} one")
        return EditSet(
            self.deltas + other.deltas,
            self.base_fingerprint,
            self.editor,
            dict(self.hyperparameters),
            self.records + other.records,
        )

    def attach(self, vlm: VLM, rows: Rows | None = None) -> AttachedDeltas:
        return AttachedDeltas(vlm, self.deltas, rows)

    def describe(self, size_bytes: int | None = None) -> dict[str, Any]:
        return {
            **super().describe(size_bytes),
            "deltas": [{"layer": d.layer, "module": d.module, "rank": d.rank} for d in self.deltas],
            "hyperparameters": self.hyperparameters,
        }

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> int:
        """Write the edit set atomically (temp file + rename); returns the size in bytes."""
        check_finite(self.deltas)
        tensors = {}
        for i, d in enumerate(self.deltas):
            tensors[f"delta.{i}.U"] = d.U.detach().float().contiguous().cpu()
            tensors[f"delta.{i}.V"] = d.V.detach().float().contiguous().cpu()
            if d.K is not None:
                tensors[f"delta.{i}.K"] = d.K.detach().float().contiguous().cpu()
        return write_safetensors(path, tensors, self.manifest())

    @classmethod
    def load(cls, path: str | os.PathLike, vlm: VLM | None = None) -> EditSet:
        """Read and validate an edit set; with ``vlm``, also check it fits that model."""
        meta, tensors = read_safetensors(path, "edit set")
        edit_set = cls.from_parts(meta, tensors, source=str(path))
        if vlm is not None:
            edit_set.check_compatible(vlm)
        return edit_set

    @classmethod
    def from_parts(cls, meta: dict[str, str], tensors: dict[str, torch.Tensor], source: str = "edit set") -> EditSet:
        """An edit set from a file's metadata and tensors, validated (``source`` names the file in errors)."""
        man = read_manifest(
            meta,
            source,
            FORMAT,
            FORMAT_VERSION,
            "an EditLens edit set",
            ("base_fingerprint", "editor", "deltas", "records"),
        )
        deltas = []
        expected = set()
        for i, info in enumerate(man["deltas"]):
            names = (f"delta.{i}.U", f"delta.{i}.V")
            expected.update(names)
            missing = [n for n in names if n not in tensors]
            if missing:
                raise EditSetError(f"{source}: tensors {missing} are missing")
            U, V = (check_tensor(tensors[n], n, source, dim=2) for n in names)
            if U.shape[1] != V.shape[1] or U.shape[1] != info.get("rank"):
                raise EditSetError(
                    f"{source}: delta {i} has U {tuple(U.shape)} and V {tuple(V.shape)}, "
                    f"but the manifest says rank {info.get('rank')}"
                )
            if [int(U.shape[0]), int(V.shape[0])] != info.get("shape"):
                raise EditSetError(
                    f"{source}: delta {i} has shape {[int(U.shape[0]), int(V.shape[0])]}, "
                    f"but the manifest says {info.get('shape')}"
                )
            K = None
            if info.get("keys"):
                name = f"delta.{i}.K"
                expected.add(name)
                if name not in tensors:
                    raise EditSetError(f"{source}: tensor {name!r} is missing")
                K = check_tensor(tensors[name], name, source, dim=2)
                if K.shape != V.shape:
                    raise EditSetError(f"{source}: delta {i} has keys {tuple(K.shape)} but V {tuple(V.shape)}")
            deltas.append(LowRankDelta(int(info["layer"]), str(info["module"]), U, V, K))
        check_no_extra(tensors, expected, source)
        return cls(
            deltas,
            str(man["base_fingerprint"]),
            str(man["editor"]),
            dict(man.get("hyperparameters") or {}),
            list(man["records"]),
        )

    def check_compatible(self, vlm: VLM) -> None:
        """Raise unless every delta fits a module of ``vlm`` and the base fingerprints agree."""
        check_fingerprint(self.base_fingerprint, vlm, "this edit set")
        check_linear_shapes(vlm, [(d.module, (int(d.U.shape[0]), int(d.V.shape[0]))) for d in self.deltas])


def check_linear_shapes(vlm: VLM, targets: Iterable[tuple[str, tuple[int, int]]]) -> None:
    """Raise ``EditSetError`` unless each (module path, (d_out, d_in)) is a linear layer of that shape."""
    for i, (path, shape) in enumerate(targets):
        try:
            mod = vlm.module(path)
        except AttributeError:
            raise EditSetError(f"delta {i} targets {path!r}, which this model does not have") from None
        w = getattr(mod, "weight", None)
        if not isinstance(mod, torch.nn.Linear) or w is None:
            raise EditSetError(f"delta {i} targets {path!r}, which is not a linear layer")
        if tuple(w.shape) != tuple(shape):
            raise EditSetError(f"delta {i} has shape {tuple(shape)} but {path} has weight shape {tuple(w.shape)}")


def check_finite(deltas: Iterable[LowRankDelta], source: str = "edit set") -> None:
    """Raise ``EditSetError`` naming the first delta that holds NaN or infinite values."""
    for i, d in enumerate(deltas):
        for name, t in (("U", d.U), ("V", d.V), ("K", d.K)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise EditSetError(f"{source}: delta {i} ({name}) holds NaN or infinite values")


class AttachedDeltas:
    """Forward hooks that add the deltas' contributions (to ``rows`` of the batch only, when given);
    ``remove()`` restores the base model exactly."""

    def __init__(self, vlm: VLM, deltas: Sequence[Delta], rows: Rows | None = None):
        by_module: dict[str, list[Delta]] = {}
        for d in deltas:
            by_module.setdefault(d.module, []).append(d)
        self._hooks = Hooks()
        with self._hooks.installing():
            for path, ds in by_module.items():
                self._hooks.add(vlm.module(path), adding_hook(tuple(ds), rows))

    def remove(self) -> None:
        self._hooks.remove()

    def __enter__(self) -> AttachedDeltas:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def adding_hook(deltas: tuple[Delta, ...], rows: Rows | None = None):
    """A forward hook adding the deltas' contributions to the module's output: every row's, or those of
    ``rows`` (the other rows of the batch keep the base output; each row's sum is the one it would get
    alone)."""

    def added(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        add = deltas[0].contribution(x)
        for d in deltas[1:]:
            add = add + d.contribution(x)
        return (out.float() + add).to(out.dtype)

    def hook(_mod, args, out):
        if rows is None:
            return added(args[0], out)
        if not len(rows):
            return None
        index = rows.index.to(out.device)
        new = out.clone()
        new[index] = added(args[0][index], out[index])
        return new

    return hook


class Attached:
    """Several attachments removed together (the result of ``attach``)."""

    def __init__(self, stack: contextlib.ExitStack):
        self._stack = stack

    def remove(self) -> None:
        self._stack.close()

    def __enter__(self) -> Attached:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach(vlm: VLM, *edits: EditSetBase | Sequence[Delta] | None, rows: Rows | None = None) -> Attached:
    """Attach edit sets (of any editor) and/or lists of deltas to ``vlm`` for the calling thread (and, with
    ``rows``, for those rows of a batch only); ``None`` is skipped. Usable as a context manager; if attaching
    one of them fails, none stays attached."""
    stack = contextlib.ExitStack()
    try:
        for e in edits:
            if e is None:
                continue
            if isinstance(e, (list, tuple)):
                stack.enter_context(AttachedDeltas(vlm, e, rows))
            else:
                stack.enter_context(e.attach(vlm, rows) if rows is not None else e.attach(vlm))
    except BaseException:
        stack.close()
        raise
    return Attached(stack)
