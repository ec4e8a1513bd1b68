"""Which layer should an edit touch? Each answer comes with the scores that chose it.

* MultEdit (Basu §4.1, §5): the MLP whose output at the constraint's last
  token has the largest indirect effect in the token-replacement trace
  (window 1), averaged over the request's variants (its image and question,
  the reworded question, another image of the subject), among the early
  layers (the first ``early_fraction`` of the model, where the paper finds
  the visual facts). The score is the isolated effect (``trace.causal_trace``
  with ``isolate``: the other layers' MLPs keep their corrupted outputs), which
  credits the MLP that writes the fact rather than the first one upstream of
  it; the plain effect is stored beside it. On the world's model both peak
  at layer 0 for its own facts; after an edit at layer k the isolated one
  peaks at k in 33 of 40 edits, the plain one in 10 (``bench diagnostics``,
  ground truth; ``trace.edit_trace``, which needs the edit, in 40).
* VisEdit's VEAD (Chen §3–4): the module-output attribution rises in the
  deep layers, which read the visual states; the adapter goes at the input
  of the first layer of the block of high-contribution layers (total
  attention + MLP contribution ≥ ``threshold`` × its maximum, the contiguous
  block that holds the maximum), so every one of them sees the edited
  visual states. On LLaVA-1.5-7B the paper's choice is layer 18 of 32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from vlm.loading import VLM

from .attribution import module_attribution
from .cases import DiagnosticCase, prepare
from .errors import DiagnosticError
from .trace import causal_trace

CaseProgress = Callable[[int, int], None]   # (cases done, cases total)


@dataclass
class LayerRecommendation:
    editor: str                    # "multedit" | "visedit"
    layer: int
    scores: list[float]            # the per-layer score that chose it
    candidates: list[int]          # the layers it was chosen from
    criterion: str
    cases: int
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def recommend_multedit_layer(vlm: VLM, cases: Sequence[DiagnosticCase], early_fraction: float = 0.5,
                             window: int = 1, progress: CaseProgress | None = None) -> LayerRecommendation:
    if not cases:
        raise DiagnosticError("a layer recommendation needs at least one case")
    if not 0 < early_fraction <= 1:
        raise DiagnosticError("early_fraction must be in (0, 1]")
    L = vlm.num_layers
    early = list(range(max(1, int(round(L * early_fraction)))))
    per_case = []
    for i, case in enumerate(cases):
        iso = causal_trace(vlm, case, kinds=["mlp"], window=window, roles=["constraint last"], isolate=True)
        plain = causal_trace(vlm, case, kinds=["mlp"], window=window, roles=["constraint last"],
                             replacement=iso.replacement)
        per_case.append({"label": case.label, "question": case.question, "p_clean": iso.p_clean,
                         "p_corrupt": iso.p_corrupt, "replacement": iso.replacement,
                         "mlp_effect_isolated": iso.effects["mlp"][0], "mlp_effect": plain.effects["mlp"][0]})
        if progress:
            progress(i + 1, len(cases))
    scores = [sum(c["mlp_effect_isolated"][l] for c in per_case) / len(per_case) for l in range(L)]
    plain = [sum(c["mlp_effect"][l] for c in per_case) / len(per_case) for l in range(L)]
    layer = max(early, key=lambda l: scores[l])
    return LayerRecommendation(
        editor="multedit", layer=layer, scores=scores, candidates=early,
        criterion=f"peak isolated MLP indirect effect at the constraint's last token (token replacement, "
                  f"window {window}), mean over {len(cases)} case(s), among layers {early[0]}-{early[-1]}",
        cases=len(cases), details={"mlp_effect_plain": plain, "per_case": per_case})


def recommend_vead_layer(vlm: VLM, cases: Sequence[DiagnosticCase], threshold: float = 0.5,
                         progress: CaseProgress | None = None) -> LayerRecommendation:
    if not cases:
        raise DiagnosticError("a layer recommendation needs at least one case")
    if not 0 < threshold <= 1:
        raise DiagnosticError("threshold must be in (0, 1]")
    L = vlm.num_layers
    attn, mlp = [0.0] * L, [0.0] * L
    for i, case in enumerate(cases):
        m = module_attribution(vlm, prepare(vlm, case))
        attn = [a + b / len(cases) for a, b in zip(attn, m.attention)]
        mlp = [a + b / len(cases) for a, b in zip(mlp, m.mlp)]
        if progress:
            progress(i + 1, len(cases))
    total = [a + b for a, b in zip(attn, mlp)]
    peak = max(range(L), key=lambda l: total[l])
    start = peak
    while start > 0 and total[start - 1] >= threshold * total[peak]:
        start -= 1
    end = peak
    while end + 1 < L and total[end + 1] >= threshold * total[peak]:
        end += 1
    return LayerRecommendation(
        editor="visedit", layer=start, scores=total, candidates=list(range(L)),
        criterion=f"input of the first layer of the high module-contribution block {start}-{end} "
                  f"(attention + MLP contribution ≥ {threshold:g} × the peak at layer {peak}), "
                  f"mean over {len(cases)} case(s)",
        cases=len(cases), details={"attention": attn, "mlp": mlp, "block": [start, end], "peak": peak})


def request_cases(question: str, constraint: str, image, rephrase: str | None = None, image_rephrase=None,
                  pixel_values=None, replacements: Sequence[str] = ()) -> list[DiagnosticCase]:
    """The variants of one edit request that a recommendation averages over."""
    out = [DiagnosticCase(question, constraint, image=image, pixel_values=pixel_values, label="request",
                          replacements=list(replacements))]
    if rephrase:
        out.append(DiagnosticCase(rephrase, constraint, image=image, pixel_values=pixel_values, label="rephrase",
                                  replacements=list(replacements)))
    if image_rephrase is not None:
        out.append(DiagnosticCase(question, constraint, image=image_rephrase, label="image_rephrase",
                                  replacements=list(replacements)))
    return out
