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
  An adapter on visual states can only act where the answer still depends
  on them, so the image read-out (``image_readout``: the drop of P(O) when
  text may not attend to the image from layer l on) is measured too; when it
  has vanished by the block's start, the adapter moves down to the deepest
  layer still read (``details["paper_layer"]`` keeps the paper's choice).
  The world's model reads its image only in
  layer 0 (read-out 0.88 at layer 0, 0.001 from layer 1 on), so its VEAD
  goes to layer 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlm.architecture import early_layers
from vlm.loading import VLM
from vlm.patching import Knockout

from .attribution import module_attribution
from .cases import DiagnosticCase, prepare
from .engine import Cell, CellRunner
from .errors import DiagnosticError
from .trace import NEGLIGIBLE_EFFECT, causal_trace

CaseProgress = Callable[[int, int], None]  # (cases done, cases total)


@dataclass
class LayerRecommendation:
    editor: str  # "multedit" | "visedit"
    layer: int
    scores: list[float]  # the per-layer score that chose it
    candidates: list[int]  # the layers it was chosen from
    criterion: str
    cases: int
    details: dict = field(default_factory=dict)
    score_name: str = "score"  # what ``scores`` are, in words (the figure's legend)
    plotted: dict[str, str] = field(default_factory=dict)  # per-layer series in ``details`` -> their legend
    #: False: every score is negligible (``trace.NEGLIGIBLE_EFFECT``), so ``layer`` is no recommendation, only
    #: the fallback an edit with layer "auto" uses (the peak of effects that are all noise); ``criterion`` says so
    localised: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def render_evidence(evidence: dict, path) -> Path:
    """The bar chart of a recommendation (``LayerRecommendation.to_dict()``): its scores per layer and the
    series it names in ``plotted``, titled with the chosen layer."""
    from .render import render_bars

    scores = evidence["scores"]
    groups = {evidence.get("score_name", "score"): scores}
    details = evidence.get("details") or {}
    for key, label in (evidence.get("plotted") or {}).items():
        if len(details.get(key) or []) == len(scores):
            groups[label] = details[key]
    return render_bars(
        groups,
        [str(l) for l in range(len(scores))],
        path,
        title=(
            f"{evidence.get('editor', '')} layer {evidence['layer']}"
            + (
                ""
                if evidence.get("localised", True)
                else f" (a fallback: nothing localised, every score < {NEGLIGIBLE_EFFECT})"
            )
        ).strip(),
        ylabel="score",
    )


def recommend_multedit_layer(
    vlm: VLM,
    cases: Sequence[DiagnosticCase],
    early_fraction: float = 0.5,
    window: int = 1,
    progress: CaseProgress | None = None,
) -> LayerRecommendation:
    """MultEdit's layer: the peak isolated MLP indirect effect at the constraint's last token among the early layers,
    averaged over ``cases``."""
    if not cases:
        raise DiagnosticError("a layer recommendation needs at least one case")
    if not 0 < early_fraction <= 1:
        raise DiagnosticError("early_fraction must be in (0, 1]")
    L = vlm.num_layers
    early = early_layers(L, early_fraction)
    per_case = []
    for i, case in enumerate(cases):
        iso = causal_trace(vlm, case, kinds=["mlp"], window=window, roles=["constraint last"], isolate=True)
        plain = causal_trace(
            vlm, case, kinds=["mlp"], window=window, roles=["constraint last"], replacement=iso.replacement
        )
        per_case.append(
            {
                "label": case.label,
                "question": case.question,
                "p_clean": iso.p_clean,
                "p_corrupt": iso.p_corrupt,
                "replacement": iso.replacement,
                "mlp_effect_isolated": iso.effects["mlp"][0],
                "mlp_effect": plain.effects["mlp"][0],
            }
        )
        if progress:
            progress(i + 1, len(cases))
    scores = [sum(c["mlp_effect_isolated"][l] for c in per_case) / len(per_case) for l in range(L)]
    plain = [sum(c["mlp_effect"][l] for c in per_case) / len(per_case) for l in range(L)]
    layer = max(early, key=lambda l: scores[l])
    localised = max(abs(scores[l]) for l in early) >= NEGLIGIBLE_EFFECT
    criterion = (
        f"peak isolated MLP indirect effect at the constraint's last token (token replacement, "
        f"window {window}), mean over {len(cases)} case(s), among layers {early[0]}-{early[-1]}"
    )
    if not localised:
        criterion = (
            f"nothing localised: the largest isolated MLP effect is {max(abs(scores[l]) for l in early):.2g}, "
            f"below {NEGLIGIBLE_EFFECT} (no layer carries the answer, e.g. an entity the model never saw); layer "
            f"{layer} is only the peak of that noise, the fallback of an edit with layer auto. {criterion}"
        )
    return LayerRecommendation(
        editor="multedit",
        layer=layer,
        scores=scores,
        candidates=early,
        criterion=criterion,
        localised=localised,
        cases=len(cases),
        details={"mlp_effect_plain": plain, "per_case": per_case},
        score_name="isolated MLP effect",
        plotted={"mlp_effect_plain": "plain MLP effect"},
    )


def image_readout(vlm: VLM, prep, mode: str = "batched") -> list[float]:
    """Per layer l: the relative drop of P(O) when no text position may attend to the image tokens
    in any layer from l on (1 − P_blocked / P_clean). How much the answer still depends on the
    visual states at the input of layer l: an adapter that changes only those states can act
    only where this is large."""
    p = prep.prompt
    image = p.image_positions
    text = list(range(image[-1] + 1, p.length))
    L = vlm.num_layers
    cells = [Cell(knockouts=[Knockout(0, list(range(l, L)), text, image)]) for l in range(L)]
    probs = CellRunner(vlm, p, prep.target_id, mode=mode).run(cells).probs.tolist()
    return [1.0 - q / prep.p_clean if prep.p_clean > 0 else 0.0 for q in probs]


def recommend_vead_layer(
    vlm: VLM,
    cases: Sequence[DiagnosticCase],
    threshold: float = 0.5,
    readout_fraction: float = 0.25,
    progress: CaseProgress | None = None,
) -> LayerRecommendation:
    """The paper's choice (input of the first layer of the high module-contribution block), moved down
    to the deepest layer whose visual states the answer still depends on when the block starts after
    the model has stopped reading the image (image read-out below ``readout_fraction`` × its value at
    layer 0 there)."""
    if not cases:
        raise DiagnosticError("a layer recommendation needs at least one case")
    if not 0 < threshold <= 1:
        raise DiagnosticError("threshold must be in (0, 1]")
    if not 0 < readout_fraction < 1:
        raise DiagnosticError("readout_fraction must be in (0, 1)")
    L = vlm.num_layers
    attn, mlp, readout = [0.0] * L, [0.0] * L, [0.0] * L
    for i, case in enumerate(cases):
        prep = prepare(vlm, case)
        m = module_attribution(vlm, prep)
        attn = [a + b / len(cases) for a, b in zip(attn, m.attention)]
        mlp = [a + b / len(cases) for a, b in zip(mlp, m.mlp)]
        readout = [a + b / len(cases) for a, b in zip(readout, image_readout(vlm, prep))]
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
    floor = readout_fraction * readout[0]
    reading = [l for l in range(start + 1) if readout[l] >= floor]
    layer = reading[-1] if reading else 0
    criterion = (
        f"input of the first layer of the high module-contribution block {start}-{end} "
        f"(attention + MLP contribution ≥ {threshold:g} × the peak at layer {peak})"
    )
    if layer != start:
        criterion += (
            f"; the answer no longer depends on the visual states from layer {layer + 1} on "
            f"(image read-out {readout[layer + 1]:.3f} < {readout_fraction:g} × {readout[0]:.3f} at "
            f"layer 0), so the adapter "
            f"goes to layer {layer}, the deepest that is still read ({readout[layer]:.3f})"
        )
    return LayerRecommendation(
        editor="visedit",
        layer=layer,
        scores=total,
        candidates=list(range(L)),
        criterion=criterion + f", mean over {len(cases)} case(s)",
        cases=len(cases),
        details={
            "attention": attn,
            "mlp": mlp,
            "block": [start, end],
            "peak": peak,
            "paper_layer": start,
            "image_readout": readout,
            "readout_fraction": readout_fraction,
        },
        score_name="module contribution (attention + MLP)",
        plotted={"image_readout": "image read-out"},
    )


def request_cases(
    question: str,
    constraint: str,
    image,
    rephrase: str | None = None,
    image_rephrase=None,
    pixel_values=None,
    replacements: Sequence[str] = (),
) -> list[DiagnosticCase]:
    """The variants of one edit request that a recommendation averages over."""
    out = [
        DiagnosticCase(
            question,
            constraint,
            image=image,
            pixel_values=pixel_values,
            label="request",
            replacements=list(replacements),
        )
    ]
    if rephrase:
        out.append(
            DiagnosticCase(
                rephrase,
                constraint,
                image=image,
                pixel_values=pixel_values,
                label="rephrase",
                replacements=list(replacements),
            )
        )
    if image_rephrase is not None:
        out.append(
            DiagnosticCase(
                question, constraint, image=image_rephrase, label="image_rephrase", replacements=list(replacements)
            )
        )
    return out


#: the rules that choose an editor's layer, by name (an editor names its rule: ``EditorSpec.layer_rule``)
LAYER_RULES: dict[str, Callable[..., LayerRecommendation]] = {
    "mlp_peak": recommend_multedit_layer,  # MultEdit, AlphaEdit, KeyGate: the causal trace's MLP peak
    "vead": recommend_vead_layer,  # VisEdit: before the high module-contribution layers
}
