"""The scope gate of VisEdit: which live edits an input is about, decided before the VEAD runs.

The paper's VEAD scales every stored edit by its influence map C, a sigmoid
that is small on unrelated images but never zero; with many live edits the
small leaks add up (``docs/visedit.md``). The scope gate is a decision in
front of it, GRACE's and LiveEdit's idea on images:

* every edit has an **image key**: the mean of the edit image's visual states
  at the adapter's layer, each at unit RMS, as a unit vector (``image_keys``).
  The tied influence mapper's own image embedding f1([c, c]) was measured as
  the alternative and is worse: it maps most images of the world to nearly
  the same vector (1 % of unrelated pairs at cosine ≥ 0.99999; recall 0.06 at
  a false-accept rate of 1 %, against 0.32 for the mean state);
* the gate also holds **reference keys**: images of the subjects the model
  already knows (on a world: the training renderings of its known entities),
  each labelled with its subject. An input is in an edit's scope when its
  key's cosine with the edit's key is at least the threshold τ, no reference
  key is nearer (an image of a subject the model knows stays with that
  subject) and no other edit's key is nearer (only the nearest edit image's
  edits open, as in GRACE's codebook: with E live edits a false accept then
  costs one wrong subject, not one per edit above τ);
* and the gate reads the **question**: its key is the mean of the question's
  unit token embeddings (``QuestionReader``), compared with the edit
  question's and with **reference questions** — the model's training
  questions, labelled with what they ask (the relation). An edit opens only
  when its question, or a reference question with its label, is nearer than
  every reference question with another label: another question about the
  edited subject's image keeps the base model's answer, and of several edits
  about one subject each question gets only its own. An edit whose image is one of a known subject's references
  (cosine ≥ ``CLAIM_COS``) claims that subject: it is a counterfactual of what
  the model knows, so every reference image of the subject becomes a key of
  the edit (and stops guarding);
* τ is **calibrated**: the cosine that unrelated pairs (images of different
  subjects, none of them references) exceed at the target false-accept rate,
  with the recall of same-subject pairs at that τ reported beside it.

An input matched by no edit runs the base model bit for bit (the hook leaves
its states untouched); an input in scope runs the VEAD with the matching
edits only, so the cost of many live edits is one key and one matrix product
per image, not one cross-attention per edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vlm.loading import VLM

from .adapter import VEAD

NEAREST_TIE = 1e-4  # edit keys within this of the nearest one are the same image: all of them open
CLAIM_COS = 0.999  # an edit key this close to a reference key is that reference's image: the edit claims its subject
FAR_LEVELS = (1e-2, 1e-3, 1e-4)  # false-accept rates whose recall a calibration reports


@torch.no_grad()
def image_keys(vead: VEAD, visual: torch.Tensor) -> torch.Tensor:
    """Unit keys (..., k) of images from their visual states (..., N_v, d) at the adapter's layer (the key does
    not depend on the adapter's weights: edits made with any adapter of one model compare alike)."""
    k = VEAD.context(visual.float())  # (..., d): the mean of the states at unit RMS
    return k / k.norm(dim=-1, keepdim=True).clamp(min=1e-12)


class QuestionReader:
    """Finds a prompt's question among its token ids (after the image, before the chat template's turn
    end) and makes its key: the mean of its tokens' unit input embeddings, as a unit vector."""

    def __init__(self, vlm: VLM):
        from PIL import Image

        from vlm.images import process_image
        from vlm.prompts import encode

        probe = "what is this ?"
        pix = process_image(vlm.processor, Image.new("RGB", (64, 64)))
        p = encode(vlm.processor, probe, pixel_values=pix, constraints=[probe])
        start, end = p.constraint_spans[0]
        self.gap = start - p.image_span[1]  # template tokens between the image and the question
        self.suffix = p.input_ids[end:].tolist()  # the template after the question (the turn end)
        self.pad = vlm.tokenizer.pad_token_id
        self.embeddings = vlm.model.get_input_embeddings()

    def span(self, ids: torch.Tensor, image_end: int) -> tuple[int, int]:
        """[start, end) of the question in one row's ids whose image ends at ``image_end``."""
        ids = ids.tolist()
        start, n, k = image_end + self.gap, len(ids), len(self.suffix)
        for i in range(start, n - k + 1):
            if k and ids[i : i + k] == self.suffix:
                return start, i
        while n > start and ids[n - 1] == self.pad:
            n -= 1
        return start, n

    @torch.no_grad()
    def keys(self, ids: torch.Tensor, image_ends: list[int]) -> torch.Tensor:
        """(B, d) unit question keys of rows ``ids`` (B, T)."""
        out = []
        for row, end in zip(ids, image_ends):
            a, b = self.span(row, end)
            if b <= a:
                out.append(torch.zeros(self.embeddings.weight.shape[1]))
                continue
            e = self.embeddings(row[a:b].to(self.embeddings.weight.device)).float()
            k = (e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12)).mean(0)
            out.append((k / k.norm().clamp(min=1e-12)).cpu())
        return torch.stack(out)


@dataclass
class Scope:
    """A calibrated scope gate: threshold τ, the reference keys (R, k) and their subject labels, and the
    reference question keys (Q, d) with their labels (what each question asks; empty: images only)."""

    threshold: float
    reference: torch.Tensor
    subjects: list[str]
    far_target: float
    calibration: dict[str, Any] = field(default_factory=dict)
    question_reference: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    question_labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.subjects) != int(self.reference.shape[0]):
            raise ValueError("one subject label per reference key")
        if len(self.question_labels) != int(self.question_reference.shape[0]):
            raise ValueError("one label per reference question")
        ids = {s: i for i, s in enumerate(dict.fromkeys(self.subjects))}
        self._subject_ids = torch.tensor([ids[s] for s in self.subjects], dtype=torch.int64)
        qids = {s: i for i, s in enumerate(dict.fromkeys(self.question_labels))}
        self._question_ids = torch.tensor([qids[s] for s in self.question_labels], dtype=torch.int64)

    @property
    def asks(self) -> bool:
        """Whether the gate also reads the question (it has reference questions)."""
        return bool(self.question_labels)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "far_target": self.far_target,
            "subjects": self.subjects,
            "question_labels": self.question_labels,
            "calibration": self.calibration,
        }

    @classmethod
    def from_manifest(
        cls, man: dict[str, Any], reference: torch.Tensor, question_reference: torch.Tensor | None = None
    ) -> Scope:
        labels = [str(s) for s in man.get("question_labels") or []]
        if labels and question_reference is None:
            raise ValueError("the reference question keys are missing")
        return cls(
            float(man["threshold"]),
            reference.float(),
            [str(s) for s in man["subjects"]],
            float(man["far_target"]),
            dict(man.get("calibration") or {}),
            question_reference.float() if labels else torch.zeros(0, 0),
            labels,
        )

    def question_claims(self, edit_questions: torch.Tensor) -> torch.Tensor:
        """(E,) the label of the reference question each edit's question is (cosine ≥ CLAIM_COS), or -1."""
        out = torch.full((edit_questions.shape[0],), -1, dtype=torch.int64)
        if self.asks and edit_questions.shape[0]:
            best = (edit_questions.float() @ self.question_reference.T).max(dim=1)
            hit = best.values >= CLAIM_COS
            out[hit] = self._question_ids[best.indices[hit]]
        return out

    def question_match(self, questions: torch.Tensor, edit_questions: torch.Tensor, claims: torch.Tensor):
        """(B, E) whether each input question (B, d) asks what each edit's question (E, d) asks: the edit's
        question, or a reference question with the edit's label, is nearer than every reference question
        with another label."""
        dev = questions.device
        q = questions.float()
        own = q @ edit_questions.to(dev, torch.float32).T  # (B, E)
        ref = q @ self.question_reference.to(dev).T  # (B, Q)
        labels = self._question_ids.to(dev)
        n = int(labels.max()) + 1
        by_label = torch.full((q.shape[0], n), -2.0, device=dev)
        by_label.scatter_reduce_(1, labels.expand_as(ref), ref, reduce="amax")
        claims = claims.to(dev)
        has = claims >= 0
        if bool(has.any()):
            own[:, has] = torch.maximum(own[:, has], by_label[:, claims[has]])
        top = by_label.topk(min(2, n), dim=1)
        first, first_label = top.values[:, :1], top.indices[:, :1]
        second = top.values[:, 1:2] if n > 1 else torch.full_like(first, -2.0)
        other = torch.where(first_label == claims.unsqueeze(0), second, first)  # best reference of another label
        return own >= other

    def claims(self, edit_keys: torch.Tensor) -> torch.Tensor:
        """(E,) the subject each edit claims — the subject one of whose reference images is the edit's
        image (cosine ≥ CLAIM_COS) — or -1."""
        out = torch.full((edit_keys.shape[0],), -1, dtype=torch.int64)
        if self.reference.numel() and edit_keys.shape[0]:
            best = (edit_keys.float() @ self.reference.to(edit_keys.device).T).max(dim=1)
            hit = (best.values >= CLAIM_COS).cpu()
            out[hit] = self._subject_ids[best.indices.cpu()[hit]]
        return out

    def decide(self, keys: torch.Tensor, edit_keys: torch.Tensor, claims: torch.Tensor | None = None) -> torch.Tensor:
        """(B, E) whether each input (keys (B, k)) is in each edit's scope (edit_keys (E, k)). An edit that
        claims a subject (``claims``, from ``Scope.claims``) also matches through that subject's references,
        which then no longer guard."""
        dev = keys.device
        keys = keys.float()
        scores = keys @ edit_keys.to(dev, torch.float32).T  # (B, E)
        guard = torch.full((keys.shape[0],), -2.0, device=dev)
        if self.reference.numel():
            ref = keys @ self.reference.to(dev).T  # (B, R)
            subjects = self._subject_ids.to(dev)
            claims = torch.full((scores.shape[1],), -1, dtype=torch.int64) if claims is None else claims
            claims = claims.to(dev)
            claimed = torch.isin(subjects, claims[claims >= 0])
            if bool((~claimed).any()):
                guard = ref[:, ~claimed].max(dim=1).values
            has = claims >= 0
            if bool(has.any()):
                n = int(subjects.max()) + 1
                best = torch.full((keys.shape[0], n), -2.0, device=dev)
                best.scatter_reduce_(1, subjects.expand_as(ref), ref, reduce="amax")
                scores[:, has] = torch.maximum(scores[:, has], best[:, claims[has]])
        nearest = scores.max(dim=1, keepdim=True).values if scores.shape[1] else scores
        return (scores >= self.threshold) & (scores >= guard.unsqueeze(1)) & (scores >= nearest - NEAREST_TIE)


def calibrate(positives: torch.Tensor, negatives: torch.Tensor, far: float) -> tuple[float, dict[str, Any]]:
    """τ with at most ``far`` of the ``negatives`` (cosines of unrelated pairs) at or above it, and what that
    costs on the ``positives`` (cosines of same-subject pairs): recall at τ and at every level of FAR_LEVELS."""
    if not 0 < far < 1:
        raise ValueError("the false-accept rate must be in (0, 1)")
    if negatives.numel() < 10 or positives.numel() < 10:
        raise ValueError("calibrating a scope needs at least 10 same-subject and 10 unrelated pairs")
    neg = negatives.double().sort().values
    pos = positives.double()

    def tau_at(rate: float) -> float:
        # the smallest τ above all but floor(rate · n) negatives
        allowed = int(rate * neg.numel())
        return float(neg[neg.numel() - 1 - allowed]) + 1e-6 if allowed < neg.numel() else -1.0

    tau = tau_at(far)
    levels = {}
    for rate in sorted(set(FAR_LEVELS) | {far}, reverse=True):
        t = tau_at(rate)
        levels[f"{rate:g}"] = {
            "threshold": round(t, 6),
            "recall": round(float((pos >= t).double().mean()), 4),
            "false_accept": round(float((neg >= t).double().mean()), 6),
        }
    report = {
        "positive_pairs": int(pos.numel()),
        "negative_pairs": int(neg.numel()),
        "positive_cos_mean": round(float(pos.mean()), 4),
        "negative_cos_mean": round(float(neg.mean()), 4),
        "negative_cos_max": round(float(neg[-1]), 4),
        "levels": levels,
        "recall": levels[f"{far:g}"]["recall"],
        "false_accept": levels[f"{far:g}"]["false_accept"],
        "resolution": round(1.0 / neg.numel(), 8),  # the smallest rate this many negatives can show
    }
    return tau, report
