"""What every editor and every edit set is: the two base classes the editor registry works with.

An **edit set** (``EditSetBase``) is the product of an editor: edits that can be
saved to one safetensors file, loaded back (validated), attached to a loaded
model (thread-scoped forward hooks; removing them restores the base model bit
for bit) and described. Each editor has its own class, e.g.
``editors.edit_set.EditSet`` (MultEdit's low-rank deltas).

An **editor** (``EditorBase``) turns ``EditRequest``s into an edit set:
``edit`` (jointly), ``edit_sequentially`` (one after another, each on the model
with the earlier ones attached; ``onto`` is the live version's edit set of the
same editor) and ``edit_each`` (independent single edits). It also says what
the version manifest records of each new edit (``manifest_records``): the
hyperparameters, and the evidence for the layer it chose.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, ClassVar

import torch

from vlm.hooks import Rows
from vlm.loading import VLM
from vlm.prompts import EncodedPrompt, encode

from .files import EditSetError, read_manifest, read_safetensors, write_safetensors
from .request import EditRequest, ProgressCallback


class EditSetBase(ABC):
    """Edits of one editor for one base model, as stored in one file.

    The file format is written here once: a safetensors file whose metadata ``editlens`` is the manifest —
    the header (``format``, ``format_version``, ``base_fingerprint``, ``editor``), the subclass's body
    (``manifest_body``) and the edits' ``records`` — and whose tensors are the subclass's (``tensors``). A
    subclass says which format it is (``FORMAT``, ``FORMAT_VERSION``, the versions it reads, ``KIND`` for
    messages, the body fields a file must have) and reads its body back (``from_manifest``)."""

    #: the manifest's ``format`` and the version written; READS: the versions read (default: that one)
    FORMAT: ClassVar[str] = ""
    FORMAT_VERSION: ClassVar[int] = 1
    READS: ClassVar[tuple[int, ...]] = ()
    #: how messages name a file of this format, e.g. "a KeyGate edit set"
    KIND: ClassVar[str] = "an EditLens edit set"
    #: the manifest fields a file must have besides the header and the records
    REQUIRED: ClassVar[tuple[str, ...]] = ()

    editor: str
    base_fingerprint: str
    records: list[dict[str, Any]]

    @property
    def num_edits(self) -> int:
        return len(self.records)

    # ------------------------------------------------------------------ files
    @abstractmethod
    def manifest_body(self) -> dict[str, Any]:
        """The manifest fields of this format (between the header and the records)."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the file holds, by name (float32 or int64, contiguous, on the CPU)."""

    @classmethod
    @abstractmethod
    def from_manifest(cls, man: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> EditSetBase:
        """The edit set from a checked manifest and the file's tensors, validated (``source`` names the file)."""

    def manifest(self) -> dict[str, Any]:
        """The whole manifest: the header, the format's body, the records."""
        return {
            "format": self.FORMAT,
            "format_version": self.FORMAT_VERSION,
            "base_fingerprint": self.base_fingerprint,
            "editor": self.editor,
            **self.manifest_body(),
            "records": self.records,
        }

    def save(self, path: str | os.PathLike) -> int:
        """Write the edit set atomically (temporary file, then rename); returns the file's size in bytes. Refuses
        (``EditSetError``, nothing written) to save NaN or infinite values."""
        tensors = self.tensors()
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise EditSetError(f"refusing to save {', '.join(bad[:3])}: NaN or infinite values")
        return write_safetensors(path, tensors, self.manifest())

    @classmethod
    def load(cls, path: str | os.PathLike, vlm: VLM | None = None) -> EditSetBase:
        """Read and validate a file; with ``vlm``, also check that it fits that model."""
        meta, tensors = read_safetensors(path, cls.KIND.split(" ", 1)[-1])
        edit_set = cls.from_parts(meta, tensors, source=str(path))
        if vlm is not None:
            edit_set.check_compatible(vlm)
        return edit_set

    @classmethod
    def from_parts(cls, meta: dict[str, str], tensors: dict[str, torch.Tensor], source: str = "edit set"):
        """An edit set from a file's metadata and tensors, validated (``source`` names the file in errors)."""
        man = read_manifest(
            meta,
            source,
            cls.FORMAT,
            cls.READS or cls.FORMAT_VERSION,
            cls.KIND,
            ("base_fingerprint", *cls.REQUIRED, "records"),
        )
        return cls.from_manifest(man, tensors, source)

    @abstractmethod
    def attach(self, vlm: VLM, rows: Rows | None = None):
        """Apply the edits to ``vlm`` in the calling thread; returns an object with ``remove()`` that is also
        a context manager. Removing gives back the base model's outputs bit for bit. With ``rows``
        (``vlm.hooks.Rows``) only those rows of a batch are edited, each exactly as it would be alone; the
        other rows keep the base model's outputs (batched serving of several versions at once)."""

    @abstractmethod
    def check_compatible(self, vlm: VLM) -> None:
        """Raise (``EditSetError`` / ``FingerprintMismatchError``) unless the edits fit ``vlm``."""

    def describe(self, size_bytes: int | None = None) -> dict[str, Any]:
        """A JSON-ready summary (editor, number of edits, base model; with ``size_bytes`` the file size)."""
        out: dict[str, Any] = {
            "editor": self.editor,
            "edits": self.num_edits,
            "base_fingerprint": self.base_fingerprint,
        }
        if size_bytes is not None:
            out["file_bytes"] = size_bytes
            out["bytes_per_edit"] = math.ceil(size_bytes / max(1, self.num_edits))
        return out


class EditorBase(ABC):
    """An editor around one loaded model and one configuration."""

    name: ClassVar[str] = ""

    vlm: VLM
    #: how the editor's layer was chosen (a ``LayerRecommendation.to_dict()``), when it chose it itself
    layer_evidence: dict[str, Any] | None = None
    #: True: the editor reads its edits off the base model alone (VisEdit's signals: its adapter was trained on
    #: the base model's states); False: it computes them on the model as the version to extend serves it
    reads_base_model: ClassVar[bool] = False

    @abstractmethod
    def hyperparameters(self, mode: str) -> dict[str, Any]:
        """The settings an edit set records (``mode``: joint, sequential or single)."""

    @abstractmethod
    def edit(
        self, requests: Sequence[EditRequest], onto: EditSetBase | None = None, progress: ProgressCallback | None = None
    ) -> EditSetBase:
        """All ``requests`` at once, computed on the model with ``onto`` attached; ``onto`` extended by them."""

    @abstractmethod
    def edit_sequentially(
        self, requests: Sequence[EditRequest], onto: EditSetBase | None = None, progress: ProgressCallback | None = None
    ) -> EditSetBase:
        """One request after another, each on the model with ``onto`` and the earlier ones attached."""

    @abstractmethod
    def edit_each(
        self, requests: Sequence[EditRequest], batch_size: int = 16, progress: ProgressCallback | None = None
    ) -> list[EditSetBase]:
        """Independent single edits, each from the current model."""

    def manifest_records(self, edit_set: EditSetBase, first: int = 0) -> list[dict[str, Any]]:
        """The version-manifest records of the edits ``edit_set.records[first:]``: each edit's own record
        with the editor's hyperparameters and the evidence for its layer."""
        hp = {k: v for k, v in self.hyperparameters("sequential").items() if k != "layer_evidence"}
        return [
            {**rec, "hyperparameters": hp, "layer_evidence": self.layer_evidence} for rec in edit_set.records[first:]
        ]


class DownProjEditor(EditorBase):
    """An editor of the ``down_proj`` of ``config.layer`` (MultEdit, FT-L)."""

    def __init__(self, vlm: VLM, config: Any):
        config.check(vlm)
        self.vlm = vlm
        self.config = config
        self.module = vlm.arch.module_path("down_proj", config.layer)

    def hyperparameters(self, mode: str) -> dict[str, Any]:
        return {**asdict(self.config), "mode": mode}

    def encode(self, request: EditRequest) -> EncodedPrompt:
        """The request's prompt with its new answer and its constraint located."""
        return encode(
            self.vlm.processor,
            request.question,
            image=request.image,
            answer=request.answer,
            constraints=[request.constraint],
            pixel_values=request.pixel_values,
        )
