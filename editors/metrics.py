"""Edit quality: the E-VQA metrics and MultEdit's efficacy / generalisation / specificity.

E-VQA convention (Cheng et al. 2023, as EasyEdit computes it): every figure
is a teacher-forced token accuracy, averaged per case and then over cases.

* reliability       — (edit image, edit question) → new answer
* text generality   — (edit image, rephrased question) → new answer
* modal generality  — (another image of the entity, edit question) → new answer;
                      in the world's cases another rendering the model was
                      trained on, and ``modal_generality_heldout`` (reported
                      beside, not in the mean) a rendering it never saw
* text locality     — an unrelated text-only question: share of its answer
                      tokens whose argmax after the edit equals the argmax
                      before it (agreement with the pre-edit model)
* modal locality    — the same for an unrelated image question; and, reported
                      beside (not in the mean), ``modal_locality_near``: the
                      edit question on an image of another subject whose look
                      differs from the edited subject's in one attribute (a
                      near neighbour, ``vlm.world.stream.NearNeighbours``;
                      cases given ``image_near`` by the bench), agreement with
                      the pre-edit model as for modal locality

MultEdit's paper (§5.2) adds, with P(O*) teacher-forced over all answer tokens:

* efficacy          — mean P(O*) on the edit question
* generalisation    — mean P(O*) on the rephrased question (and, reported
                      beside it, on the other image)
* specificity       — exact-match accuracy on a panel of unrelated visual
                      questions (about other entities) before vs after.

The records are the world's edit cases (``edit_cases/test.json``); any JSON
list of records with the same fields works.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm.images import ProcessedImage, load_image, process_image
from vlm.loading import VLM
from vlm.prompts import EncodedPrompt, encode
from vlm.scoring import AnswerScore, score_answers
from vlm.world.folder import WorldFolder

from .attach import attach

EVQA = ("reliability", "text_generality", "modal_generality", "text_locality", "modal_locality")
PAPER = ("efficacy", "generalisation", "modal_generalisation", "specificity_before", "specificity_after")
EXTRA = ("modal_generality_heldout", "modal_locality_near")
# beside EXTRA's means, how many cases each was computed on (cases without a held-out rendering or a neighbour
# are left out of that figure)
EXTRA_CASES = {k: f"{k}_cases" for k in EXTRA}
CASE_FIELDS = (
    "src",
    "rephrase",
    "alt",
    "constraint",
    "image",
    "image_rephrase",
    "loc",
    "loc_ans",
    "m_loc",
    "m_loc_q",
    "m_loc_a",
)


class CaseError(ValueError):
    pass


class PixelCache:
    """Processed pixel values per image path (the same renderings recur across cases)."""

    def __init__(self, vlm: VLM, root: Path):
        self.vlm, self.root, self._cache = vlm, Path(root), {}

    def __call__(self, rel: str) -> ProcessedImage:
        if rel not in self._cache:
            img = load_image(self.root / rel)
            self._cache[rel] = process_image(self.vlm.processor, img)
        return self._cache[rel]


@dataclass
class CasePrompts:
    case: dict[str, Any]
    reliability: EncodedPrompt
    text_generality: EncodedPrompt
    modal_generality: EncodedPrompt
    text_locality: EncodedPrompt
    modal_locality: EncodedPrompt
    modal_heldout: EncodedPrompt | None = None
    modal_near: EncodedPrompt | None = None  # the edit question on a near neighbour's image (``image_near``)

    def all(self) -> list[EncodedPrompt]:
        return [
            self.reliability,
            self.text_generality,
            self.modal_generality,
            self.text_locality,
            self.modal_locality,
        ] + ([self.modal_heldout] if self.modal_heldout is not None else [])


def load_cases(path: str | Path) -> list[dict[str, Any]]:
    """Edit cases from a JSON file in the world's format; a ``CaseError`` naming what is missing otherwise."""
    path = Path(path)
    try:
        cases = json.loads(path.read_text())
    except FileNotFoundError:
        raise CaseError(f"case file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise CaseError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(cases, list) or not cases:
        raise CaseError(f"{path} must hold a non-empty JSON list of edit cases")
    for i, c in enumerate(cases):
        missing = [f for f in CASE_FIELDS if not isinstance(c, dict) or f not in c]
        if missing:
            raise CaseError(f"{path}: case {i} lacks the fields {missing}")
    return cases


def case_prompts(vlm: VLM, case: dict[str, Any], pixels: PixelCache) -> CasePrompts:
    """The encoded prompts every metric of one case is scored on."""
    proc = vlm.processor

    def visual(question: str, image: str, answer: str, constraint: str | None = None) -> EncodedPrompt:
        return encode(
            proc, question, answer=answer, constraints=[constraint] if constraint else None, pixel_values=pixels(image)
        )

    c = case
    return CasePrompts(
        case=c,
        reliability=visual(c["src"], c["image"], c["alt"], c["constraint"]),
        text_generality=visual(c["rephrase"], c["image"], c["alt"], c["constraint"]),
        modal_generality=visual(c["src"], c["image_rephrase"], c["alt"], c["constraint"]),
        text_locality=encode(proc, c["loc"], answer=c["loc_ans"]),
        modal_locality=visual(c["m_loc_q"], c["m_loc"], c["m_loc_a"]),
        modal_heldout=visual(c["src"], c["image_heldout"], c["alt"], c["constraint"])
        if c.get("image_heldout")
        else None,
        modal_near=visual(c["src"], c["image_near"], c["near_answer"]) if c.get("image_near") else None,
    )


def specificity_panel(
    vlm: VLM, world_dir: Path, pixels: PixelCache, size: int, seed: int = 0
) -> list[tuple[str | None, EncodedPrompt]]:
    """(entity, prompt) pairs: held-out visual questions sampled with a fixed seed."""
    items = WorldFolder(world_dir).questions("heldout_paraphrase")
    items = [q for q in items if q.get("image")]
    rng = random.Random(f"specificity-{seed}")
    sample = rng.sample(items, min(size, len(items)))
    return [
        (q.get("entity"), encode(vlm.processor, q["question"], answer=q["answer"], pixel_values=pixels(q["image"])))
        for q in sample
    ]


def agreement(before: AnswerScore, after: AnswerScore) -> float:
    same = [a == b for a, b in zip(before.predicted_ids, after.predicted_ids)]
    return sum(same) / len(same)


@dataclass
class Baseline:
    """Pre-edit scores: locality references and the specificity panel."""

    text_locality: list[AnswerScore]
    modal_locality: list[AnswerScore]
    panel: list[tuple[str | None, EncodedPrompt]]
    panel_correct: list[bool]
    modal_near: list[AnswerScore | None] | None = None  # per case, where it has a near neighbour's prompt

    def upto(self, n: int) -> Baseline:
        """The references of the first ``n`` cases (the same panel)."""
        near = self.modal_near[:n] if self.modal_near is not None else None
        return Baseline(self.text_locality[:n], self.modal_locality[:n], self.panel, self.panel_correct, near)


def baseline(vlm: VLM, prompts: Sequence[CasePrompts], panel: list[tuple[str | None, EncodedPrompt]]) -> Baseline:
    """The pre-edit model's answers on the cases' locality probes and on the specificity panel."""
    return Baseline(
        text_locality=score_answers(vlm, [p.text_locality for p in prompts]),
        modal_locality=score_answers(vlm, [p.modal_locality for p in prompts]),
        panel=panel,
        panel_correct=[s.exact for s in score_answers(vlm, [p for _, p in panel])],
        modal_near=near_references(vlm, prompts),
    )


def near_references(vlm: VLM, prompts: Sequence[CasePrompts]) -> list[AnswerScore | None]:
    """The pre-edit model's answers on the cases' near-neighbour prompts (None for a case without one); scored
    in a call of their own, so that the other prompts' batches stay as they were."""
    near = [p.modal_near for p in prompts if p.modal_near is not None]
    scores = iter(score_answers(vlm, near, batch_size=64) if near else [])
    return [next(scores) if p.modal_near is not None else None for p in prompts]


def near_edited(cp: CasePrompts, edited: set[tuple[str, str]]) -> bool:
    """Whether an edit in ``edited`` ((entity, relation) facts) rewrote the fact the case's near-neighbour
    prompt asks (then the prompt should change, and is left out of modal_locality_near)."""
    return (cp.case.get("near_entity"), cp.case.get("relation")) in edited


def score_case(vlm: VLM, cp: CasePrompts, i: int, base: Baseline, near: bool = True) -> dict[str, float]:
    """The metrics of case ``i`` on the model as it is now (edit attached by the caller); ``near`` false leaves
    out the near-neighbour prompt (an edit attached rewrote the fact it asks)."""
    entity = cp.case.get("entity")
    panel_idx = [j for j, (e, _) in enumerate(base.panel) if e != entity]
    own = cp.all()
    scores = score_answers(vlm, own + [base.panel[j][1] for j in panel_idx], batch_size=64)
    rel, tgen, mgen, tloc, mloc = scores[:5]
    panel_after = scores[len(own) :]
    out = {
        "reliability": rel.token_accuracy,
        "text_generality": tgen.token_accuracy,
        "modal_generality": mgen.token_accuracy,
        "text_locality": agreement(base.text_locality[i], tloc),
        "modal_locality": agreement(base.modal_locality[i], mloc),
        "efficacy": rel.prob,
        "generalisation": tgen.prob,
        "modal_generalisation": mgen.prob,
    }
    if cp.modal_heldout is not None:
        out["modal_generality_heldout"] = scores[5].token_accuracy
    reference = base.modal_near[i] if base.modal_near is not None else None
    if near and cp.modal_near is not None and reference is not None:
        (after,) = score_answers(vlm, [cp.modal_near])  # a call of its own: the batch above stays as it was
        out["modal_locality_near"] = agreement(reference, after)
    if panel_idx:
        out["specificity_before"] = sum(base.panel_correct[j] for j in panel_idx) / len(panel_idx)
        out["specificity_after"] = sum(s.exact for s in panel_after) / len(panel_idx)
    return out


def summarise(per_case: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases, overall and per case type (counterfactual / insertion)."""

    def mean(rows, key):
        vals = [r[key] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else None

    def block(rows):
        out = {"cases": len(rows)}
        for k in EVQA + PAPER + EXTRA:
            if any(k in r for r in rows):
                out[k] = mean(rows, k)
        evqa = [out[k] for k in EVQA if out.get(k) is not None]
        out["evqa_mean"] = sum(evqa) / len(evqa) if evqa else None
        for k, n in EXTRA_CASES.items():
            out[n] = sum(k in r for r in rows)
        return out

    result = {"all": block(per_case)}
    for kind in sorted({r.get("type") for r in per_case if r.get("type")}):
        result[kind] = block([r for r in per_case if r.get("type") == kind])
    return result


def evaluate_single_edits(
    vlm: VLM,
    prompts: Sequence[CasePrompts],
    base: Baseline,
    edits: Sequence[Any],
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Each case scored with its own edit attached (``edits[i]``: an EditSet or deltas)."""
    rows = []
    for i, (cp, e) in enumerate(zip(prompts, edits)):
        with attach(vlm, e):
            m = score_case(vlm, cp, i, base)
        rows.append({"case_id": cp.case.get("case_id"), "type": cp.case.get("type"), **m})
        if progress:
            progress(i + 1, len(prompts))
    return rows


def evaluate_together(vlm: VLM, prompts: Sequence[CasePrompts], base: Baseline, edits: Any) -> list[dict[str, Any]]:
    """Every case scored with the same edits attached (sequential or joint editing); a near-neighbour prompt
    whose fact one of the cases' edits rewrote is left out."""
    edited = {(cp.case.get("entity"), cp.case.get("relation")) for cp in prompts}
    rows = []
    with attach(vlm, edits):
        for i, cp in enumerate(prompts):
            m = score_case(vlm, cp, i, base, near=not near_edited(cp, edited))
            rows.append({"case_id": cp.case.get("case_id"), "type": cp.case.get("type"), **m})
    return rows


def spread_cases(cases: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` cases keeping the file's mix of case types (the first of each type, in proportion); all of them
    when there are no more than ``n``."""
    if n >= len(cases):
        return list(cases)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for c in cases:
        by_type.setdefault(c.get("type", ""), []).append(c)
    out = []
    for items in by_type.values():
        out += items[: max(1, round(n * len(items) / len(cases)))]
    return out[:n]
