"""Attention knockout (Zhang et al., "Cross-modal information flow", §3.2).

For each layer ℓ the target positions may not attend to the source positions
in the window of layers around ℓ (an explicit additive −inf mask per layer;
SDPA without padding would pass no mask at all). The score is the relative
change of P(O) at the last prompt position: (P_knocked − P_clean) / P_clean.

Relations (positions of the prepared prompt):
* ``image->question``  question tokens may not see the image tokens
* ``image->last``      the last position may not see the image tokens
* ``question->last``   the last position may not see the question tokens
* ``last->last``       the last position may not see itself
* ``region->question`` question tokens may not see one region of image
  tokens: by default each row of the patch grid is its own region
  (``image 0-3->question`` ...), or the patch indices given.

"Question" is every text token after the image up to, not including, the
last prompt position (the chat template's tokens included).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from vlm.loading import VLM
from vlm.patching import Knockout

from .cases import DiagnosticCase, Prepared, prepare
from .engine import Cell, CellRunner, Progress
from .errors import DiagnosticError
from .trace import check_window, window_layers

RELATIONS = ("image->question", "image->last", "question->last", "last->last", "region->question")


@dataclass
class KnockoutResult:
    window: int
    curves: dict[str, list[float]]  # relation → relative change of P(O) per layer
    p_clean: float
    answer: str
    question: str
    label: str = ""
    cases: int = 1
    cells: int = 0
    forward_passes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def relation_sets(
    prep: Prepared,
    relations: Sequence[str],
    regions: Sequence[Sequence[int]] | None = None,
    image_block: int | None = None,
) -> dict[str, tuple[list[int], list[int]]]:
    """relation name → (targets, sources) positions."""
    p = prep.prompt
    image = p.image_positions  # in runs where the image was split into crops
    i1 = p.image_span[1]
    last = [p.last_prompt_pos]
    question = list(range(i1, p.last_prompt_pos))
    bad = [r for r in relations if r not in RELATIONS]
    if bad or not relations:
        raise DiagnosticError(f"unknown knockout relation(s) {bad or list(relations)}; choose from {list(RELATIONS)}")
    out: dict[str, tuple[list[int], list[int]]] = {}
    for r in relations:
        if r == "image->question":
            out[r] = (question, image)
        elif r == "image->last":
            out[r] = (last, image)
        elif r == "question->last":
            out[r] = (last, question)
        elif r == "last->last":
            out[r] = (last, last)
        else:
            if regions is None:
                n = len(image)
                block = image_block or max(1, int(round(n**0.5)))
                regions = [list(range(s, min(s + block, n))) for s in range(0, n, block)]
            for reg in regions:
                bad_idx = [k for k in reg if not 0 <= k < len(image)]
                if bad_idx or not reg:
                    raise DiagnosticError(f"image region {list(reg)} is outside patches 0..{len(image) - 1}")
                out[f"image {min(reg)}-{max(reg)}->question"] = (question, [image[k] for k in reg])
    if not question and any(r.endswith("question") or r.startswith("question") for r in relations):
        raise DiagnosticError("the prompt has no question tokens between the image and the last position")
    return out


def knockout(
    vlm: VLM,
    case: DiagnosticCase | Prepared,
    relations: Sequence[str] = RELATIONS[:4],
    window: int = 3,
    regions: Sequence[Sequence[int]] | None = None,
    image_block: int | None = None,
    mode: str = "batched",
    batch_size: int = 64,
    progress: Progress | None = None,
) -> KnockoutResult:
    """Attention knockout (Zhang et al.): per layer window and relation, the relative change of P(O) when the
    relation's targets may not attend to its sources."""
    t0 = time.perf_counter()
    check_window(window, vlm.num_layers)
    prep = case if isinstance(case, Prepared) else prepare(vlm, case)
    sets = relation_sets(prep, relations, regions, image_block)
    L = vlm.num_layers
    cells, index = [], []
    for name, (targets, sources) in sets.items():
        for layer in range(L):
            cells.append(Cell(knockouts=[Knockout(0, window_layers(layer, window, L), targets, sources)]))
            index.append(name)
    runner = CellRunner(vlm, prep.prompt, prep.target_id, mode=mode, batch_size=batch_size)
    res = runner.run(cells, progress)
    curves: dict[str, list[float]] = {name: [] for name in sets}
    for name, pr in zip(index, res.probs.tolist()):
        curves[name].append((pr - prep.p_clean) / prep.p_clean)
    return KnockoutResult(
        window=window,
        curves=curves,
        p_clean=prep.p_clean,
        answer=prep.target_token,
        question=prep.case.question,
        label=prep.case.label,
        cells=len(cells),
        forward_passes=res.forward_passes,
        seconds=time.perf_counter() - t0,
    )


def average_knockouts(results: Sequence[KnockoutResult]) -> KnockoutResult:
    """The mean of several cases' knockout results (same relations and layers)."""
    if not results:
        raise DiagnosticError("nothing to average")
    names = [n for n in results[0].curves if all(n in r.curves for r in results)]
    n = len(results)
    curves = {
        name: [sum(r.curves[name][l] for r in results) / n for l in range(len(results[0].curves[name]))]
        for name in names
    }
    return KnockoutResult(
        window=results[0].window,
        curves=curves,
        p_clean=sum(r.p_clean for r in results) / n,
        answer="",
        question="",
        label=f"mean of {n} cases",
        cases=n,
        cells=sum(r.cells for r in results),
        forward_passes=sum(r.forward_passes for r in results),
        seconds=sum(r.seconds for r in results),
    )
