"""The VisEdit edit-set format: one trained adapter plus one signal per edit, in one safetensors file.

* tensors ``vead.<name>`` — the adapter's parameters (``VEAD.state_dict()``), once;
* tensors ``signal.<i>.states`` (N_i × d) and ``signal.<i>.last`` (d) — edit i's signal, and with a
  scope gate ``signal.<i>.key`` (k) — its edit image's scope key;
* with a scope gate (``scope.py``): ``scope.reference`` (R × k), the reference keys, and in the
  manifest ``adapter.scope`` (threshold τ, target false-accept rate, the references' subjects, the
  calibration report);
* metadata key ``editlens``: a JSON manifest with ``format`` ("editlens.visedit_set"),
  ``format_version``, ``base_fingerprint`` (``vlm.loading``), ``editor`` ("visedit"),
  ``adapter`` (its ``config``, ``parameter_count``, ``sha256`` of the weights, and
  ``training``: how it was trained, the layer evidence, the validation loss) and
  one ``records`` entry per edit (request, layers, metrics, timings).

A trained adapter with no edits yet is an edit set with zero signals: the same
file, validated the same way, is what ``editlens visedit train`` writes and
what every later edit starts from. Loading checks the manifest, the base
fingerprint, that every adapter tensor is present with the shape the config
implies (and nothing else), that the signals fit the model's hidden size, and
that every value is finite; any failure is an ``EditSetError`` naming it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from editors.base import EditSetBase
from editors.files import (
    FLOAT_DTYPES,
    EditSetError,
    check_fingerprint,
)
from vlm.hooks import Rows
from vlm.loading import VLM

from .adapter import SIGNAL_ROWS, VEAD, AttachedVEAD, EditSignal, VEADConfig
from .scope import QuestionReader, Scope, image_keys

FORMAT = "editlens.visedit_set"
FORMAT_VERSION = 2  # 2: the optional scope gate; version 1 files (no gate) are read as they are
READS_VERSIONS = (1, 2)


def weights_digest(vead: VEAD) -> str:
    """sha256 over the adapter's parameters (names, shapes and float32 bytes), to tell adapters apart."""
    h = hashlib.sha256()
    for name, t in sorted(vead.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass
class VisEditSet(EditSetBase):
    """A trained VEAD and the signals of the edits made with it."""

    FORMAT: ClassVar[str] = FORMAT
    FORMAT_VERSION: ClassVar[int] = FORMAT_VERSION
    READS: ClassVar[tuple[int, ...]] = READS_VERSIONS
    KIND: ClassVar[str] = "a VisEdit edit set"
    REQUIRED: ClassVar[tuple[str, ...]] = ("adapter", "signals")

    vead: VEAD
    base_fingerprint: str
    signals: list[EditSignal] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    editor: str = "visedit"
    scope: Scope | None = None  # the calibrated scope gate (None: the paper's ungated form)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)  # the gate's tables, made once

    @property
    def config(self) -> VEADConfig:
        return self.vead.config

    @property
    def num_edits(self) -> int:
        return len(self.signals)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """What an edit-set reader (e.g. the service's manifest) shows about how the edits were made."""
        return {
            "adapter": self.config.to_dict(),
            "adapter_sha256": weights_digest(self.vead),
            "layer_evidence": self.training.get("layer_evidence"),
            "scope": None if self.scope is None else self._scope_summary(),
        }

    def _scope_summary(self) -> dict[str, Any]:
        cal = self.scope.calibration
        return {
            "threshold": round(self.scope.threshold, 6),
            "far_target": self.scope.far_target,
            "recall": cal.get("recall"),
            "references": len(self.scope.subjects),
        }

    def manifest_body(self) -> dict[str, Any]:
        return {
            "adapter": {
                "config": self.config.to_dict(),
                "parameter_count": self.vead.parameter_count(),
                "sha256": weights_digest(self.vead),
                "training": self.training,
                "scope": None if self.scope is None else self.scope.to_manifest(),
            },
            "signals": [{"rows": int(s.states.shape[0])} for s in self.signals],
        }

    def with_edits(self, signals: list[EditSignal], records: list[dict[str, Any]]) -> VisEditSet:
        """A new edit set: this one's adapter and edits, then ``signals`` (this one is not changed)."""
        if len(signals) != len(records):
            raise ValueError("one record per signal")
        return VisEditSet(
            self.vead,
            self.base_fingerprint,
            self.signals + list(signals),
            self.records + list(records),
            dict(self.training),
            self.editor,
            self.scope,
        )

    def without_edits(self) -> VisEditSet:
        """The same trained adapter with no edits (what a new lineage starts from)."""
        return VisEditSet(self.vead, self.base_fingerprint, [], [], dict(self.training), self.editor, self.scope)

    def with_signal_rows(self, rows: str) -> VisEditSet:
        """The same trained adapter (no edits) keeping ``rows`` of each later edit's signal ("all" or "text")."""
        from dataclasses import replace

        if self.signals:
            raise EditSetError("what a signal keeps is chosen before the first edit; this set holds edits")
        if rows not in SIGNAL_ROWS:
            raise EditSetError(f"signal rows must be one of {', '.join(SIGNAL_ROWS)}, not {rows!r}")
        vead = VEAD(replace(self.config, signal_rows=rows))
        vead.load_state_dict(self.vead.state_dict())
        vead.eval()
        vead.requires_grad_(False)
        return VisEditSet(vead, self.base_fingerprint, [], [], dict(self.training), self.editor, self.scope)

    def with_scope(self, scope: Scope | None) -> VisEditSet:
        """The same adapter and edits under another scope gate (None: ungated); edits made without a gate
        have no keys and are refused."""
        signals = list(self.signals)
        missing = scope is not None and any(s.key is None or (scope.asks and s.question is None) for s in signals)
        if missing:
            raise EditSetError(
                "these edits have no scope keys; edit again with the gated adapter (edits keep their requests)"
            )
        return VisEditSet(
            self.vead, self.base_fingerprint, signals, list(self.records), dict(self.training), self.editor, scope
        )

    def describe(self, size_bytes: int | None = None) -> dict[str, Any]:
        return {
            **super().describe(size_bytes),
            "adapter": self.config.to_dict(),
            "parameter_count": self.vead.parameter_count(),
            "adapter_sha256": weights_digest(self.vead),
            "scope": None if self.scope is None else self._scope_summary(),
        }

    def same_adapter(self, other: VisEditSet) -> bool:
        """Whether ``other`` holds the same trained adapter (its weights, not just its config)."""
        return weights_digest(other.vead) == weights_digest(self.vead)

    def edit_keys(self) -> torch.Tensor:
        """(E, k) the edits' scope keys (a scope gate's edit sets only)."""
        if self.scope is None or any(s.key is None for s in self.signals):
            raise EditSetError("this edit set has no scope gate")
        return torch.stack([s.key.float() for s in self.signals])

    def image_gate(self):
        """The image half of the scope decision: visual states (B, N_v, d) → (B, E) (``Scope.decide``)."""
        scope, vead = self.scope, self.vead
        if "image" not in self._cache:
            keys = self.edit_keys()
            self._cache["image"] = (keys, scope.claims(keys))
        keys, claims = self._cache["image"]

        def decide(visual: torch.Tensor) -> torch.Tensor:
            return scope.decide(image_keys(vead, visual), keys.to(visual.device), claims)

        return decide

    def gate(self, vlm: VLM):
        """The scope decision of this edit set's live edits: (visual states (B, N_v, d), token ids (B, T),
        image ends) → (B, E) selection (``scope.py``). An edit of a subject the model knows (its image is one
        of the references) matches through all of that subject's reference images; with reference questions,
        an edit opens only for questions that ask what its own asks."""
        scope, by_image = self.scope, self.image_gate()
        if scope.asks and "questions" not in self._cache:
            if any(s.question is None for s in self.signals):
                raise EditSetError("this scope gate reads questions, but some edits have no question key")
            questions = torch.stack([s.question.float() for s in self.signals])
            self._cache["questions"] = (questions, scope.question_claims(questions))

        def decide(visual: torch.Tensor, ids: torch.Tensor, image_ends: list[int]) -> torch.Tensor:
            select = by_image(visual)
            if scope.asks and bool(select.any()):  # the question is read only where an image is in scope
                if self._cache.get("reader", (None,))[0] is not vlm:
                    self._cache["reader"] = (vlm, QuestionReader(vlm))
                questions, q_claims = self._cache["questions"]
                asked = self._cache["reader"][1].keys(ids, image_ends).to(visual.device)
                select = select & scope.question_match(asked, questions, q_claims)
            return select

        return decide

    def attach(self, vlm: VLM, rows: Rows | None = None) -> AttachedVEAD | _Nothing:
        """Hooks that apply the edits (thread-scoped; ``remove()`` restores the base model): with a scope gate
        each image row gets only the edits whose scope it is in, otherwise every edit's signal; with ``rows``
        only those rows of a batch."""
        if not self.signals:
            return _Nothing()
        self.vead.to(vlm.input_device)
        return AttachedVEAD(
            vlm, self.vead, self.signals, mode="all", gate=None if self.scope is None else self.gate(vlm), rows=rows
        )

    # ------------------------------------------------------------------ files
    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's weights and every signal, as the file stores them."""
        out = {f"vead.{k}": v.detach().float().contiguous().cpu() for k, v in self.vead.state_dict().items()}
        for i, s in enumerate(self.signals):
            out[f"signal.{i}.states"] = s.states.detach().float().contiguous().cpu()
            out[f"signal.{i}.last"] = s.last.detach().float().contiguous().cpu()
            if self.scope is not None:
                if s.key is None:
                    raise EditSetError(f"edit {i} has no scope key; an edit set with a scope gate needs one per edit")
                out[f"signal.{i}.key"] = s.key.detach().float().contiguous().cpu()
                if self.scope.asks:
                    if s.question is None:
                        raise EditSetError(f"edit {i} has no question key; this scope gate reads questions")
                    out[f"signal.{i}.question"] = s.question.detach().float().contiguous().cpu()
        if self.scope is not None:
            out["scope.reference"] = self.scope.reference.detach().float().contiguous().cpu()
            if self.scope.asks:
                out["scope.question_reference"] = self.scope.question_reference.detach().float().contiguous().cpu()
        return out

    @classmethod
    def from_manifest(cls, man: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> VisEditSet:
        try:
            config = VEADConfig.from_dict(man["adapter"]["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EditSetError(f"{source}: the adapter's config is malformed ({exc})") from None
        for name, t in tensors.items():
            if t.dtype not in FLOAT_DTYPES:
                raise EditSetError(f"{source}: {name} has dtype {t.dtype}; expected a floating point type")
            if not bool(torch.isfinite(t).all()):
                raise EditSetError(f"{source}: {name} holds NaN or infinite values")
        vead = VEAD(config)
        expected = {k: tuple(v.shape) for k, v in vead.state_dict().items()}
        given = {k[len("vead.") :]: t for k, t in tensors.items() if k.startswith("vead.")}
        missing = sorted(set(expected) - set(given))
        if missing:
            raise EditSetError(f"{source}: adapter tensors {missing[:5]} are missing")
        for k, t in given.items():
            if k not in expected:
                raise EditSetError(f"{source}: unexpected adapter tensor {k!r}")
            if tuple(t.shape) != expected[k]:
                raise EditSetError(
                    f"{source}: adapter tensor {k} has shape {tuple(t.shape)}, the config implies {expected[k]}"
                )
        vead.load_state_dict({k: t.float() for k, t in given.items()})
        vead.eval()
        vead.requires_grad_(False)
        scope = None
        if man["adapter"].get("scope") is not None:
            if "scope.reference" not in tensors:
                raise EditSetError(f"{source}: the scope gate's reference keys are missing")
            try:
                scope = Scope.from_manifest(
                    man["adapter"]["scope"], tensors["scope.reference"], tensors.get("scope.question_reference")
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise EditSetError(f"{source}: the scope gate is malformed ({exc})") from None
            if scope.reference.dim() != 2 or not -1 <= scope.threshold <= 1:
                raise EditSetError(f"{source}: the scope gate needs (R, k) reference keys and a cosine threshold")
        n = len(man["signals"])
        if len(man["records"]) != n:
            raise EditSetError(f"{source}: {n} signals but {len(man['records'])} records")
        signals = []
        for i in range(n):
            names = (f"signal.{i}.states", f"signal.{i}.last")
            if any(x not in tensors for x in names):
                raise EditSetError(f"{source}: signal {i} is missing")
            states, last = tensors[names[0]].float(), tensors[names[1]].float()
            if config.summary_token == "image" and last.dim() == 2 and last.shape[0] > 1:
                last = last.mean(0, keepdim=True)  # an older file: every image row (the mapper reads their mean)
            key_ok = (
                last.dim() == 2 and last.shape[1] == config.hidden_size
                if config.summary_token == "image"
                else tuple(last.shape) == (config.hidden_size,)
            )
            if states.dim() != 2 or states.shape[1] != config.hidden_size or not key_ok:
                want = "(N_v, d)" if config.summary_token == "image" else f"({config.hidden_size},)"
                raise EditSetError(
                    f"{source}: signal {i} has shapes {tuple(states.shape)} / {tuple(last.shape)}; "
                    f"expected (N, {config.hidden_size}) / {want}"
                )
            key = question = None
            if scope is not None:
                key = tensors.get(f"signal.{i}.key")
                if key is None or key.dim() != 1 or key.shape[0] != scope.reference.shape[1]:
                    raise EditSetError(f"{source}: signal {i} has no scope key of size {scope.reference.shape[1]}")
                key = key.float()
                if scope.asks:
                    question = tensors.get(f"signal.{i}.question")
                    width = scope.question_reference.shape[1]
                    if question is None or question.dim() != 1 or question.shape[0] != width:
                        raise EditSetError(f"{source}: signal {i} has no question key of size {width}")
                    question = question.float()
            signals.append(EditSignal(states, last, key, question))
        parts = (
            ("states", "last")
            + (("key",) if scope is not None else ())
            + (("question",) if scope and scope.asks else ())
        )
        known = {f"vead.{k}" for k in expected} | {f"signal.{i}.{p}" for i in range(n) for p in parts}
        if scope is not None:
            known.add("scope.reference")
            if scope.asks:
                known.add("scope.question_reference")
        extra = sorted(set(tensors) - known)
        if extra:
            raise EditSetError(f"{source}: unexpected tensors {extra[:5]}")
        digest = man["adapter"].get("sha256")
        if digest is not None and digest != weights_digest(vead):
            raise EditSetError(f"{source}: the adapter's weights do not match the sha256 in its manifest")
        return cls(
            vead,
            str(man["base_fingerprint"]),
            signals,
            list(man["records"]),
            dict(man["adapter"].get("training") or {}),
            str(man.get("editor", "visedit")),
            scope,
        )

    def check_compatible(self, vlm: VLM) -> None:
        check_fingerprint(self.base_fingerprint, vlm, "this VisEdit adapter")
        try:
            self.config.check(vlm.num_layers, vlm.hidden_size)
        except ValueError as exc:
            raise EditSetError(f"the adapter does not fit this model: {exc}") from None


class _Nothing:
    """What attaching an edit set without edits gives: nothing to remove."""

    def remove(self) -> None:
        pass

    def __enter__(self) -> _Nothing:
        return self

    def __exit__(self, *exc) -> None:
        pass
