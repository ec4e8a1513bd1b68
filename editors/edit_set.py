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
module adds (x V) Uᵀ to its output (``editors.attach``, where ``attach``,
``adding_hook`` and the attachment classes of every editor live; they are
re-exported here for the callers that import them from this module).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlm.hooks import Rows
from vlm.loading import VLM

from .attach import AttachedDeltas
from .base import EditSetBase
from .files import (
    EditSetError,
    FingerprintMismatchError,
    IncompatibleEditSetError,
    check_fingerprint,
    check_no_extra,
    check_tensor,
)

FORMAT = "editlens.edit_set"
FORMAT_VERSION = 1


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

    FORMAT: ClassVar[str] = FORMAT
    FORMAT_VERSION: ClassVar[int] = FORMAT_VERSION
    KIND: ClassVar[str] = "an EditLens edit set"
    REQUIRED: ClassVar[tuple[str, ...]] = ("editor", "deltas")

    deltas: list[LowRankDelta]
    base_fingerprint: str
    editor: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def manifest_body(self) -> dict[str, Any]:
        return {
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
    def tensors(self) -> dict[str, torch.Tensor]:
        check_finite(self.deltas)  # names the delta that holds NaN or infinite values
        tensors = {}
        for i, d in enumerate(self.deltas):
            tensors[f"delta.{i}.U"] = d.U.detach().float().contiguous().cpu()
            tensors[f"delta.{i}.V"] = d.V.detach().float().contiguous().cpu()
            if d.K is not None:
                tensors[f"delta.{i}.K"] = d.K.detach().float().contiguous().cpu()
        return tensors

    @classmethod
    def from_manifest(cls, man: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> EditSet:
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
