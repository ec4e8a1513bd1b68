"""KeyGate: MultEdit's values behind a key gate — a lifelong editor that leaves unedited inputs exactly alone.

MultEdit writes a fact as a new output z* = z + δ of one early MLP's
``down_proj`` at the key k (the ``down_proj`` input at the visual
constraint's last token). Its rank-one weight update also moves every input
that overlaps k, and edits pile up in one d × d_ff matrix: on the world model
(d_ff = 512) 50 accumulated edits broke two thirds of the unrelated facts.
KeyGate keeps MultEdit's key and value and replaces the weight update by a
memory read through a gate (GRACE's codebook, Hartvigsen et al. 2023, keyed
by MultEdit's subject key and guarded by the model's own keys):

* each edit stores its key k_i (d_ff) and the **entry** it belongs to; an entry
  holds one value shift δ_j (d). Facts about one subject share an entry;
* the gate also knows the **reference keys** of the preservation statistics
  (``editors.preservation``): the keys at the visual constraint of the model's
  own prompts, i.e. what its known subjects look like there;
* at every token the ``down_proj`` input x is compared, by the cosine of keys
  centred on the mean key μ, with every edit key and every reference key. If
  the nearest is an edit key and its cosine is at least τ, the output gets its
  entry's δ added; otherwise nothing is added and the output is the base
  model's, bit for bit. A reference key within ``same_subject_cos`` of an
  edit's key is *claimed* by that edit (it is the same subject to the model: a
  counterfactual of a known fact) and no longer guards. With ``scope`` fact (or
  subject) so are all the other reference keys of that fact (of that subject):
  its other renderings and wordings, where the statistics' prompts name their
  subject and relation, which the edit is then to answer. The default, key,
  claims nothing more: it keeps more of what the model knew
  (``docs/lifelong.md``).

An edit whose key is within ``same_subject_cos`` of an existing edit key joins
that entry: the entry's δ is optimised again, from zero, on the new prompt and
on the entry's earlier questions and answers asked with the new image (no image
is stored). Any other edit adds an entry. Values are optimised on the gate as
it will be once the edit is in: its key already in place (so where it is the
nearest key no other entry opens) with its entry's value zero. So edits
do not interfere with each other, nothing accumulates in a weight matrix, and n
edits of distinct subjects made one by one give the same gate as made jointly.

Storage: one key (d_ff floats) per edit and one value (d floats) per entry,
≈ 2.6 KB per edit on the world model (≈ 61 KB at LLaVA-1.5-7B's d_ff = 11008,
d = 4096). A gate is not a weight delta: it cannot be exported as a PEFT LoRA.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from vlm.hooks import Rows
from vlm.loading import VLM
from vlm.prompts import EncodedPrompt, encode
from vlm.scoring import score_answers

from .attach import Attachment, adding_hook
from .base import EditSetBase
from .configs import SCOPES, KeyGateConfig
from .edit_set import check_linear_shapes
from .files import (
    EditSetError,
    check_fingerprint,
    check_no_extra,
    check_tensor,
)
from .key_value import KeyValueEditor
from .preservation import PreservationStats, preservation_statistics
from .registry import EditorSpec, register_editor
from .request import EditProgress, EditRequest, ProgressCallback

FORMAT = "editlens.key_gate"
FORMAT_VERSION = 1


def _unit(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    x = x.float() - mean.to(x.device, torch.float32)
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


@dataclass
class Gate:
    """The gate of one layer's ``down_proj``: edit keys (E, d_ff) with their entry (E,), one value per entry
    (M, d), the threshold τ, the centre μ (d_ff) and the reference keys that still guard (R, d_ff)."""

    layer: int
    module: str
    mean: torch.Tensor
    keys: torch.Tensor
    entry_of: torch.Tensor  # int64
    values: torch.Tensor
    threshold: float
    reference: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # (R, d_ff) all reference keys
    claimed: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # (R,) claimed by a key
    reference_subject: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # (R,) or -1
    _cache: tuple | None = field(default=None, repr=False, compare=False)

    def claim(self, keys: torch.Tensor, same: float) -> None:
        """Mark as claimed the reference keys within ``same`` (centred cosine) of ``keys``, and every reference
        key of a fact one of whose keys is (the edit rewrites a fact the model knows: all of its renderings and
        wordings are the edit's to answer; the subject's other facts stay guarded)."""
        if self.reference.numel() and keys.shape[0]:
            close = (_unit(self.reference, self.mean) @ _unit(keys, self.mean).T) >= same  # (R, n)
            hit = close.any(dim=1)
            if self.reference_subject.numel():
                subjects = self.reference_subject[hit & (self.reference_subject >= 0)].unique()
                hit = hit | torch.isin(self.reference_subject, subjects)
            self.claimed = self.claimed | hit
            self._cache = None

    def _table(self, device) -> tuple[torch.Tensor, int]:
        """Unit centred keys, edit keys first then the guarding references, and the number of edit keys."""
        if self._cache is None or self._cache[0].device != torch.device(device):
            refs = self.reference[~self.claimed] if self.reference.numel() else torch.zeros(0, self.keys.shape[1])
            table = _unit(torch.cat([self.keys.float(), refs.float()]).to(device), self.mean)
            self._cache = (table, int(self.keys.shape[0]))
        return self._cache

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each token of ``x`` (…, d_ff): the best centred cosine and its index (≥ E: a reference key)."""
        table, _ = self._table(x.device)
        best = (_unit(x, self.mean) @ table.T).max(dim=-1)
        return best.values, best.indices

    def firing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether the gate opens at each token, and the edit key it opens for (meaningless where closed).

        The gate opens where the best edit key is within the threshold and at least as close as every guarding
        reference key (the nearest key of edits and references together is an edit's). The reference keys —
        thousands, whatever the number of edits — are compared only at the tokens an edit key already accepts,
        so a forward pass costs one comparison with the edit keys per token, not with edits and references
        (docs/lifelong.md, "What a live edit costs")."""
        table, n_edit = self._table(x.device)
        u = _unit(x, self.mean)
        best, idx = (u @ table[:n_edit].T).max(dim=-1)
        fire = best >= self.threshold
        if table.shape[0] > n_edit and bool(fire.any()):
            nearest_ref = (u[fire] @ table[n_edit:].T).max(dim=-1).values
            fire = fire.clone()
            fire[fire.clone()] = best[fire] >= nearest_ref  # a tie goes to the edit, as in the joint argmax
        return fire, idx

    def firing_joint(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's definition, one scan of edit and reference keys together: open where the nearest key is an
        edit's and within the threshold. ``firing`` decides the same with less work (the tests compare them;
        ``editlens bench gate`` times both)."""
        cos, idx = self.scores(x)
        n_edit = self._table(x.device)[1]
        fire = (idx < n_edit) & (cos >= self.threshold)
        return fire, idx.clamp(max=max(n_edit - 1, 0))

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        if self.keys.shape[0] == 0:
            return torch.zeros(*x.shape[:-1], self.values.shape[1], device=x.device)
        fire, idx = self.firing(x)
        entry = self.entry_of.to(x.device)[idx]
        return self.values.to(x.device, torch.float32)[entry] * fire.unsqueeze(-1)


class AttachedGates(Attachment):
    """Forward hooks adding each gate's output; ``remove()`` restores the base model exactly."""

    def __init__(self, vlm: VLM, gates: Sequence[Gate], rows: Rows | None = None):
        super().__init__()
        with self._hooks.installing():
            for g in gates:
                self._hooks.add(vlm.module(g.module), adding_hook((g,), rows))


def _labels(stats: PreservationStats, scope: str) -> torch.Tensor:
    """Each reference key's claim group for ``scope``: its fact (subject and relation), its subject, or none
    (key: -1 everywhere, only keys close to an edit's are claimed)."""
    facts = stats.reference_subject
    if scope == "key" or not facts.numel():
        return torch.full_like(facts, -1)
    if scope == "fact":
        return facts
    subjects = [name.split(":")[0] for name in stats.subjects]
    ids = {s: i for i, s in enumerate(dict.fromkeys(subjects))}
    table = torch.tensor([ids[s] for s in subjects] + [-1], dtype=torch.int64)  # -1 indexes the last: -1
    return table[facts]


@dataclass
class KeyGateEditSet(EditSetBase):
    """Gates (one per edited layer) and one record per edit; each record names its ``layer``, ``key_index``
    (its row of that gate's keys) and ``entry``.

    The reference keys are not stored: they come from the preservation statistics of the base model (the
    file records their ``statistics`` digest) when the edit set is attached, less those its keys claim."""

    FORMAT: ClassVar[str] = FORMAT
    FORMAT_VERSION: ClassVar[int] = FORMAT_VERSION
    KIND: ClassVar[str] = "a KeyGate edit set"
    REQUIRED: ClassVar[tuple[str, ...]] = ("editor", "gates")

    gates: list[Gate]
    base_fingerprint: str
    editor: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    statistics: str = ""
    same_subject_cos: float = 0.999
    guard: bool = True
    scope: str = "key"

    def gate(self, layer: int) -> Gate | None:
        return next((g for g in self.gates if g.layer == layer), None)

    def with_references(self, vlm: VLM) -> KeyGateEditSet:
        """The gates with the reference keys of ``vlm``'s preservation statistics, less those the edits claim
        (a no-op for gates that have them already, or without ``guard``)."""
        if not self.guard:
            return self
        gates = []
        for g in self.gates:
            if not g.reference.numel():
                stats = preservation_statistics(vlm, g.layer)
                if self.statistics and stats.digest != self.statistics:
                    raise EditSetError(
                        f"this edit set was made with the preservation statistics {self.statistics} of layer "
                        f"{g.layer}, but this model has {stats.digest}; copy the statistics with the model folder "
                        "(editlens-statistics/) so that every replica uses the same"
                    )
                claimed = torch.zeros(len(stats.reference), dtype=torch.bool)
                g = replace(
                    g,
                    reference=stats.reference,
                    reference_subject=_labels(stats, self.scope),
                    claimed=claimed,
                    _cache=None,
                )
                g.claim(g.keys, self.same_subject_cos)
            gates.append(g)
        return replace(self, gates=gates)

    def attach(self, vlm: VLM, rows: Rows | None = None) -> AttachedGates:
        if self.guard and any(not g.reference.numel() for g in self.gates):
            self.gates = self.with_references(vlm).gates  # once: later attaches (every request) reuse them
        return AttachedGates(vlm, self.gates, rows)

    def describe(self, size_bytes: int | None = None) -> dict[str, Any]:
        return {
            **super().describe(size_bytes),
            "gates": [
                {"layer": g.layer, "module": g.module, "keys": int(g.keys.shape[0]), "entries": int(g.values.shape[0])}
                for g in self.gates
            ],
            "statistics": self.statistics,
            "hyperparameters": self.hyperparameters,
        }

    # ------------------------------------------------------------------ growing
    def added(
        self,
        layer: int,
        module: str,
        mean: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        record: dict,
        threshold: float,
        join: int | None = None,
    ) -> KeyGateEditSet:
        """A copy with one more edit: ``key`` (d_ff), or several keys (n, d_ff) — the edit's prompt's first, then
        those of the variants its request supplied — in a new entry holding ``value``, or (``join``) in that
        existing entry of the layer's gate, whose value becomes ``value``. The record names its first key
        (``key_index``) and how many it has (``keys``)."""
        key = key.float().reshape(-1, key.shape[-1])
        gates = [replace(g, _cache=None) for g in self.gates]
        g = next((x for x in gates if x.layer == layer), None)
        if g is None:
            d_ff, d = int(key.shape[-1]), int(value.shape[-1])
            g = Gate(
                layer,
                module,
                mean.float().clone(),
                torch.zeros(0, d_ff),
                torch.zeros(0, dtype=torch.int64),
                torch.zeros(0, d),
                threshold,
            )
            gates.append(g)
        if join is None:
            entry = int(g.values.shape[0])
            g.values = torch.cat([g.values, value.float().reshape(1, -1)])
        else:
            entry = join
            g.values = g.values.clone()
            g.values[join] = value.float().reshape(-1)
        first = int(g.keys.shape[0])
        g.keys = torch.cat([g.keys, key])
        g.entry_of = torch.cat([g.entry_of, torch.full((key.shape[0],), entry, dtype=torch.int64)])
        g.claim(key, self.same_subject_cos)
        rec = {**record, "layer": layer, "key_index": first, "keys": int(key.shape[0]), "entry": entry}
        return replace(self, gates=gates, records=self.records + [rec])

    def entry_records(self, layer: int, entry: int) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("layer") == layer and r.get("entry") == entry]

    # ------------------------------------------------------------------ files
    def manifest_body(self) -> dict[str, Any]:
        return {
            "hyperparameters": self.hyperparameters,
            "statistics": self.statistics,
            "same_subject_cos": self.same_subject_cos,
            "guard": self.guard,
            "scope": self.scope,
            "gates": [
                {
                    "layer": g.layer,
                    "module": g.module,
                    "threshold": g.threshold,
                    "keys": int(g.keys.shape[0]),
                    "entries": int(g.values.shape[0]),
                    "shape": [int(g.values.shape[1]), int(g.keys.shape[1])],
                }
                for g in self.gates
            ],
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for i, g in enumerate(self.gates):
            for name, t in (("mean", g.mean), ("keys", g.keys), ("values", g.values)):
                tensors[f"gate.{i}.{name}"] = t.detach().float().contiguous().cpu()
            tensors[f"gate.{i}.entry_of"] = g.entry_of.detach().to(torch.int64).contiguous().cpu()
        return tensors

    @classmethod
    def from_manifest(cls, man: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> KeyGateEditSet:
        gates, expected = [], set()
        for i, info in enumerate(man["gates"]):
            names = [f"gate.{i}.{n}" for n in ("mean", "keys", "values", "entry_of")]
            expected.update(names)
            missing = [n for n in names if n not in tensors]
            if missing:
                raise EditSetError(f"{source}: tensors {missing} are missing")
            mean = check_tensor(tensors[names[0]], names[0], source, dim=1)
            keys = check_tensor(tensors[names[1]], names[1], source, dim=2)
            values = check_tensor(tensors[names[2]], names[2], source, dim=2)
            entry_of = tensors[names[3]]
            if entry_of.dtype != torch.int64 or entry_of.dim() != 1:
                raise EditSetError(f"{source}: {names[3]} must be a 1-D int64 tensor")
            E, M = int(keys.shape[0]), int(values.shape[0])
            shape = [int(values.shape[1]), int(keys.shape[1])]
            if shape != info.get("shape") or E != info.get("keys") or M != info.get("entries"):
                raise EditSetError(f"{source}: gate {i}'s tensors do not match its manifest entry")
            if mean.shape[0] != keys.shape[1] or entry_of.shape[0] != E:
                raise EditSetError(f"{source}: gate {i}: the mean and entry_of must match its {E} keys")
            if E and (int(entry_of.min()) < 0 or int(entry_of.max()) >= M):
                raise EditSetError(f"{source}: gate {i} points keys at entries outside 0..{M - 1}")
            thr = info.get("threshold")
            if not isinstance(thr, (int, float)) or not -1 <= thr <= 1:
                raise EditSetError(f"{source}: gate {i}'s threshold must be a cosine in [-1, 1]")
            gates.append(Gate(int(info["layer"]), str(info["module"]), mean, keys, entry_of, values, float(thr)))
        check_no_extra(tensors, expected, source)
        if man.get("scope", "key") not in SCOPES:
            raise EditSetError(f"{source}: scope must be one of {', '.join(SCOPES)}")
        return cls(
            gates,
            str(man["base_fingerprint"]),
            str(man["editor"]),
            dict(man.get("hyperparameters") or {}),
            list(man["records"]),
            statistics=str(man.get("statistics") or ""),
            same_subject_cos=float(man.get("same_subject_cos", 0.999)),
            guard=bool(man.get("guard", True)),
            scope=str(man.get("scope", "key")),
        )

    def check_compatible(self, vlm: VLM) -> None:
        check_fingerprint(self.base_fingerprint, vlm, "this edit set")
        check_linear_shapes(vlm, [(g.module, (int(g.values.shape[1]), int(g.keys.shape[1]))) for g in self.gates])


class KeyGate(KeyValueEditor):
    """MultEdit's key and value, written into a key-gated memory instead of the weights (module docstring).

    ``layer="auto"`` chooses the layer as MultEdit does, once per editor (``KeyValueEditor``)."""

    name = "keygate"

    def _stats(self) -> PreservationStats:
        return preservation_statistics(self.vlm, self.config.layer)

    def _empty(self, stats: PreservationStats) -> KeyGateEditSet:
        return KeyGateEditSet(
            [],
            self.vlm.fingerprint,
            self.name,
            self.hyperparameters("sequential"),
            [],
            statistics=stats.digest,
            same_subject_cos=self.config.same_subject_cos,
            guard=self.config.guard,
            scope=self.config.scope,
        )

    def _check_onto(self, onto: EditSetBase | None) -> None:
        if onto is not None and not isinstance(onto, KeyGateEditSet):
            raise EditSetError(f"a KeyGate edit builds on a KeyGate edit set, not a {onto.editor} one")

    # ------------------------------------------------------------------ API
    def edit(
        self, requests: Sequence[EditRequest], onto: EditSetBase | None = None, progress: ProgressCallback | None = None
    ) -> KeyGateEditSet:
        """All ``requests`` at once: requests whose keys are one subject share an entry (values optimised
        together on their prompts, each with its own image); the others get one entry each. Onto a gate that
        holds edits already this is ``edit_sequentially``: edits of a gate do not interact, so one after another
        and all at once are the same (a request about a subject an entry holds joins that entry)."""
        if not requests:
            raise ValueError("no edit requests")
        self._check_onto(onto)
        if onto is not None and onto.num_edits:
            return self.edit_sequentially(requests, onto, progress)
        self.choose_layer(requests, progress)
        stats = self._stats()
        flat, rows = self._variant_rows(requests)
        K, t_key = self.keys(flat)
        K = K.cpu()
        groups = self._groups(K[[r[0] for r in rows]], stats)
        owner_group = [groups[i] for i, r in enumerate(rows) for _ in r]
        values, t_value = self.values(flat, owner_group, first=0, total=len(requests), progress=progress)
        t0 = time.perf_counter()
        new, joined = self._empty(stats), {}
        for i, req in enumerate(requests):
            record = self._record(req, values, rows[i][0], t_key, t_value)
            new = new.added(
                self.config.layer,
                self.module,
                stats.mean,
                K[rows[i]],
                values.delta[rows[i][0]],
                record,
                self.config.threshold,
                joined.get(groups[i]),
            )
            joined.setdefault(groups[i], new.records[-1]["entry"])
        for rec in new.records:
            rec["seconds"]["update"] = (time.perf_counter() - t0) / len(requests)
        return self._finish(new, [flat[r[0]] for r in rows], len(requests), progress)

    def edit_sequentially(
        self, requests: Sequence[EditRequest], onto: EditSetBase | None = None, progress: ProgressCallback | None = None
    ) -> KeyGateEditSet:
        """One request after another on the live gate: a request about a subject an entry holds re-optimises
        that entry (with the entry's earlier facts); any other adds an entry."""
        if not requests:
            raise ValueError("no edit requests")
        self._check_onto(onto)
        self.choose_layer(requests, progress)
        stats = self._stats()
        current = onto if onto is not None else self._empty(stats)
        for i, req in enumerate(requests):
            current = self._one(current, req, stats, i, len(requests), progress)
        current.hyperparameters = self.hyperparameters("sequential")
        return current

    def edit_each(
        self, requests: Sequence[EditRequest], batch_size: int = 16, progress: ProgressCallback | None = None
    ) -> list[KeyGateEditSet]:
        """Independent single edits from the base model (values optimised in batches)."""
        self.choose_layer(requests, progress)
        stats = self._stats()
        out = []
        for start in range(0, len(requests), batch_size):
            chunk = list(requests[start : start + batch_size])
            flat, rows = self._variant_rows(chunk)
            K, t_key = self.keys(flat)
            K = K.cpu()
            owner = [i for i, r in enumerate(rows) for _ in r]
            values, t_value = self.values(flat, owner, start, len(requests), progress)
            for i, req in enumerate(chunk):
                es = self._empty(stats).added(
                    self.config.layer,
                    self.module,
                    stats.mean,
                    K[rows[i]],
                    values.delta[rows[i][0]],
                    self._record(req, values, rows[i][0], t_key, t_value),
                    self.config.threshold,
                )
                es.hyperparameters = self.hyperparameters("single")
                out.append(self._finish(es, [flat[rows[i][0]]], 1, None))
        return out

    # ------------------------------------------------------------- the work
    def variants(self, req: EditRequest) -> list[EncodedPrompt]:
        """The request's prompt, then (``config.variants``) every variant the request supplies, each with the new
        answer: its rephrase on its image, its question on its image rephrase, the rephrase on the image rephrase.
        Each is a key of the edit's entry and the entry's value is optimised on all of them, so that the edit
        answers every image and wording the user gave it (and reaches further from more than one point)."""
        out = [self.encode(req)]
        if not self.config.variants:
            return out
        texts = [req.question] + ([req.rephrase] if req.rephrase else [])
        images = [(req.image, req.pixel_values)] + ([(req.image_rephrase, None)] if req.image_rephrase else [])
        for j, (image, pixels) in enumerate(images):
            for k, text in enumerate(texts):
                if j or k:
                    out.append(
                        encode(
                            self.vlm.processor,
                            text,
                            image=image,
                            answer=req.answer,
                            constraints=[req.constraint],
                            pixel_values=pixels,
                        )
                    )
        return out

    def _variant_rows(self, requests: Sequence[EditRequest]) -> tuple[list[EncodedPrompt], list[list[int]]]:
        """Every request's ``variants`` in one list, and for each request the rows of its own (its prompt first)."""
        flat: list[EncodedPrompt] = []
        rows: list[list[int]] = []
        for r in requests:
            v = self.variants(r)
            rows.append(list(range(len(flat), len(flat) + len(v))))
            flat.extend(v)
        return flat, rows

    def _groups(self, K: torch.Tensor, stats: PreservationStats) -> list[int]:
        U = _unit(K, stats.mean)
        close = (U @ U.T) >= self.config.same_subject_cos
        groups: list[int] = []
        for i in range(len(K)):
            earlier = [groups[j] for j in range(i) if bool(close[i, j])]
            groups.append(earlier[0] if earlier else (max(groups) + 1 if groups else 0))
        return groups

    def _one(self, current: KeyGateEditSet, req: EditRequest, stats, i: int, total: int, progress):
        cfg, say = self.config, progress or (lambda e: None)
        prompts = self.variants(req)
        prompt = prompts[0]
        say(EditProgress("key", i, total))
        K, t_key = self.keys(prompts)
        K = K.cpu()
        k = K[0]
        gate = current.gate(cfg.layer)
        join = None
        companions: list[EncodedPrompt] = []
        if gate is not None and gate.keys.shape[0]:
            cos = _unit(gate.keys, gate.mean) @ _unit(k[None], gate.mean)[0]
            best = int(cos.argmax())
            if float(cos[best]) >= cfg.same_subject_cos:
                join = int(gate.entry_of[best])
                companions = self._companions(current.entry_records(cfg.layer, join), req)
        # the value is optimised on the gate as it will be: the new key in place (so wherever it is the nearest,
        # the other entries stay closed, as they will), its entry's value zero
        d = self.vlm.module(self.module).weight.shape[0]
        context = current.added(cfg.layer, self.module, stats.mean, K, torch.zeros(d), {}, cfg.threshold, join)
        context = context.with_references(self.vlm)
        with context.attach(self.vlm):
            group = prompts + companions
            values, t_value = self.values(group, [0] * len(group), i, total, progress)
        say(EditProgress("update", i, total))
        record = self._record(req, values, 0, t_key, t_value)
        record["metrics"]["value_companions"] = len(companions)
        t0 = time.perf_counter()
        new = current.added(cfg.layer, self.module, stats.mean, K, values.delta[0], record, cfg.threshold, join)
        new.records[-1]["seconds"]["update"] = time.perf_counter() - t0
        return self._finish(new, [prompt], 1, progress, first=i, total=total, before=current)

    def _companions(self, records: list[dict[str, Any]], req: EditRequest) -> list[EncodedPrompt]:
        """The entry's earlier facts asked about the new request's image (one subject), without those that
        the new request asks again (its answer replaces theirs)."""
        out = []
        for r in records:
            q = r.get("request") or {}
            if not q.get("question") or q.get("question") == req.question or not q.get("answer"):
                continue
            out.append(
                encode(
                    self.vlm.processor,
                    q["question"],
                    image=req.image,
                    answer=q["answer"],
                    constraints=[q.get("constraint") or req.constraint],
                    pixel_values=req.pixel_values,
                )
            )
        return out

    def _record(self, req: EditRequest, values, i: int, t_key: float, t_value: float) -> dict[str, Any]:
        return {
            "request": req.describe(),
            "editor": self.name,
            "module": self.module,
            "metrics": {
                "delta_norm": float(values.delta[i].norm()),
                "value_steps": values.steps[i],
                "value_prob": values.prob[i],
                "value_step_size": values.step_sizes[i],
            },
            "seconds": {"key": t_key, "value": t_value, "update": 0.0},
        }

    def _finish(self, es: KeyGateEditSet, prompts, n: int, progress, first: int = 0, total: int = 1, before=None):
        """P(answer) before (on ``before``, the gate the edits were added to) and after, for the last ``n``
        records (the new edits); the gate's reference keys filled in."""
        es = es.with_references(self.vlm)
        with before.attach(self.vlm) if before is not None and before.gates else contextlib.nullcontext():
            p_before = [s.prob for s in score_answers(self.vlm, prompts)]
        with es.attach(self.vlm):
            p_after = [s.prob for s in score_answers(self.vlm, prompts)]
        for rec, b, a in zip(es.records[-n:], p_before, p_after):
            rec["metrics"]["p_before"], rec["metrics"]["p_after"] = b, a
        if progress:
            progress(EditProgress("done", first + n - 1, total))
        return es


register_editor(
    EditorSpec(
        name="keygate",
        config_class=KeyGateConfig,
        edit_set_class=KeyGateEditSet,
        editor_class=KeyGate,
        format=FORMAT,
        description="MultEdit's key and value in a key-gated memory: lifelong edits that leave other inputs alone",
        layer_rule="mlp_peak",  # layer="auto": the causal trace's MLP peak
        peft_refusal="a KeyGate edit set is a key-gated memory (it adds its values only where an input's key "
        "matches an edit's), not a weight change; a LoRA adds the same low-rank change to every input, so PEFT "
        "cannot express a gate",
        gate="key",
    )
)
