"""Run a named diagnostic and report it: numbers with labels, summary lines, the
recommended layer and the PNG figure(s).

One place for what ``editlens diagnose ...`` (local) and the server's Diagnose
call (remote) both do: run the diagnostic over one or more cases, average
them, collect its numbers as labelled matrices, render its figure and say
which layer to edit where the diagnostic tells. The CLI adds its option
parsing and progress bars, the server its wire format.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.architecture import early_layers
from vlm.errors import VLMError
from vlm.loading import VLM

from .cases import DiagnosticCase
from .errors import DiagnosticError

DIAGNOSTICS = (
    "trace",
    "noise-trace",
    "knockout",
    "contributions",
    "module-attribution",
    "visual-attribution",
    "recommend",
)
Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class Matrix:
    """Numbers with labelled rows and columns (a vector is one row)."""

    name: str
    values: list[list[float]]
    row_labels: list[str] = field(default_factory=list)
    col_labels: list[str] = field(default_factory=list)


@dataclass
class Report:
    diagnostic: str
    data: dict[str, Any]  # the result as `editlens diagnose --json` prints it (without "png")
    lines: list[str]  # the summary `editlens diagnose` prints
    matrices: list[Matrix]
    scalars: dict[str, float]
    recommended_layer: int | None = None
    recommendations: list[dict] = field(default_factory=list)  # LayerRecommendation.to_dict()
    figures: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def grid(values: Sequence[float]) -> str:
    return " ".join(f"{v:6.3f}" for v in values)


def _layers(n: int) -> list[str]:
    return [str(l) for l in range(n)]


def _each(
    cases: Sequence[DiagnosticCase], fn: Callable, case_progress: Progress | None, cell_progress: Progress | None
) -> list:
    """``fn(case, cells)`` per case; a model-layer error carries the case's label (``exc.case_label``)."""
    out = []
    for i, case in enumerate(cases):
        try:
            out.append(fn(case, cell_progress if len(cases) == 1 else None))
        except VLMError as exc:
            exc.case_label = case.label or "case"
            raise
        if case_progress:
            case_progress(i + 1, len(cases))
    return out


def _scalars(d: dict, *names: str) -> dict[str, float]:
    return {n: float(d[n]) for n in names if isinstance(d.get(n), (int, float)) and not isinstance(d.get(n), bool)}


def _figure(out: Path | None, stem_suffix: str = "") -> Path | None:
    if out is None:
        return None
    return out if not stem_suffix else out.with_name(out.stem + stem_suffix + ".png")


# ------------------------------------------------------------------- traces
def _trace_report(name: str, results: list, out: Path | None) -> Report:
    from .render import render_trace
    from .trace import NEGLIGIBLE_EFFECT, average_traces

    r = results[0] if len(results) == 1 else average_traces(results)
    d = r.to_dict()
    lines = [
        f"{r.method} trace, {r.label}: P_clean {r.p_clean:.3f}, P_corrupt {r.p_corrupt:.3f}, window {r.window}"
        + (f", replacement {r.replacement!r}" if r.replacement else "")
    ]
    matrices = []
    for kind in r.kinds:
        lines.append(f"  {kind} indirect effect per layer (rows: tokens; * constraint)")
        for row, vals in zip(r.rows, r.effects[kind]):
            lines.append(f"    {row.label[:22] + ('*' if row.constraint else ''):24s} {grid(vals)}")
        matrices.append(
            Matrix(f"{kind} indirect effect", r.effects[kind], [row.label for row in r.rows], _layers(r.num_layers))
        )
    layer = None
    if not r.localises:
        lines.append(
            f"  the trace localises nothing: its largest indirect effect is {r.largest_effect:.2g}, below "
            f"{NEGLIGIBLE_EFFECT} (P_clean {r.p_clean:.3f}, P_corrupt {r.p_corrupt:.3f}): no layer carries this "
            "answer, so no layer is recommended (trace a fact the model knows)"
        )
    elif "mlp" in r.kinds and any(row.role == "constraint last" for row in r.rows):
        eff = r.effect("mlp", "constraint last")
        layer = max(early_layers(len(eff)), key=lambda l: eff[l])
        lines.append(
            f"  recommended MultEdit layer {layer} (peak MLP effect at the constraint's last token "
            f"among layers 0-{early_layers(len(eff))[-1]})"
        )
    figures = [render_trace(r, out)] if out is not None else []
    return Report(name, d, lines, matrices, _scalars(d, "p_clean", "p_corrupt"), layer, figures=figures)


def _trace(vlm: VLM, cases, options: dict, out, case_progress, cell_progress) -> Report:
    from .trace import causal_trace

    kinds = options.get("kinds") or ["hidden", "mlp", "attn"]
    results = _each(
        cases,
        lambda c, cells: causal_trace(
            vlm,
            c,
            kinds=kinds,
            window=options.get("window", 1),
            replacement=options.get("replacement"),
            image_block=options.get("image_block"),
            isolate=bool(options.get("isolate", False)),
            mode=options.get("engine", "batched"),
            batch_size=options.get("batch_size", 64),
            progress=cells,
        ),
        case_progress,
        cell_progress,
    )
    return _trace_report("trace", results, out)


def _noise_trace(vlm: VLM, cases, options: dict, out, case_progress, cell_progress) -> Report:
    from .trace import noise_trace

    kinds = options.get("kinds") or ["hidden", "mlp", "attn"]
    results = _each(
        cases,
        lambda c, cells: noise_trace(
            vlm,
            c,
            kinds=kinds,
            window=options.get("window", 1),
            samples=options.get("samples", 5),
            noise_scale=options.get("noise_scale", 3.0),
            seed=options.get("seed", 0),
            image_block=options.get("image_block"),
            mode=options.get("engine", "batched"),
            batch_size=options.get("batch_size", 64),
            progress=cells,
        ),
        case_progress,
        cell_progress,
    )
    return _trace_report("noise-trace", results, out)


# ---------------------------------------------------------- the other views
def _contributions(vlm: VLM, cases, options: dict, out, case_progress, cell_progress) -> Report:
    from .attention import attention_contributions, average_contributions
    from .render import render_matrix, render_roc

    results = _each(
        cases,
        lambda c, cells: attention_contributions(
            vlm, c, options.get("early_layers"), mode=options.get("engine", "batched")
        ),
        case_progress,
        cell_progress,
    )
    r = results[0] if len(results) == 1 else average_contributions(results)
    d = r.to_dict()
    L = vlm.num_layers
    cols = _layers(L)
    figures = []
    if out is not None:
        figures = [
            render_matrix(
                r.visual,
                [f"image {i}" for i in range(len(r.visual))],
                cols,
                out,
                title=f"visual tokens -> constraint's last token ({r.label})",
                colorbar_label="attention contribution",
            ),
            render_matrix(
                r.constraint,
                r.constraint_tokens,
                cols,
                _figure(out, "-constraint"),
                title=f"constraint tokens -> last position ({r.label})",
                colorbar_label="attention contribution",
                cmap="Reds",
            ),
        ]
        if r.roc:
            figures.append(
                render_roc(
                    {k: (*r.roc[k], r.auroc[k]) for k in r.roc},
                    _figure(out, "-roc"),
                    title="correct vs incorrect answers",
                )
            )
    lines = [
        f"attention contributions, {r.label}",
        "  visual tokens -> constraint's last token, mean over tokens per layer: "
        + grid([sum(col) / len(col) for col in zip(*r.visual)]),
        "  constraint's last token -> last position per layer: " + grid(r.constraint[-1]),
        f"  early-failure score (layers {r.early_layers}): {r.early_score:.3f}; confidence {r.confidence:.3f}",
    ]
    if r.auroc:
        lines.append(
            f"  AUROC over {r.cases} cases: early-failure score {r.auroc['early_score']:.3f}, "
            f"confidence {r.auroc['confidence']:.3f}"
        )
    matrices = [
        Matrix(
            "visual tokens -> constraint's last token", r.visual, [f"image {i}" for i in range(len(r.visual))], cols
        ),
        Matrix("constraint tokens -> last position", r.constraint, list(r.constraint_tokens), cols),
    ]
    scalars = _scalars(d, "early_score", "confidence")
    scalars.update({f"auroc_{k}": float(v) for k, v in (r.auroc or {}).items()})
    return Report("contributions", d, lines, matrices, scalars, figures=figures)


def _knockout(vlm: VLM, cases, options: dict, out, case_progress, cell_progress) -> Report:
    from .knockout import average_knockouts, knockout
    from .render import render_curves

    results = _each(
        cases,
        lambda c, cells: knockout(
            vlm,
            c,
            relations=options.get("relations") or ["image->question", "image->last", "question->last", "last->last"],
            window=options.get("window", 3),
            regions=options.get("regions"),
            mode=options.get("engine", "batched"),
            batch_size=options.get("batch_size", 64),
            progress=cells,
        ),
        case_progress,
        cell_progress,
    )
    r = results[0] if len(results) == 1 else average_knockouts(results)
    d = r.to_dict()
    figures = []
    if out is not None:
        figures = [
            render_curves(
                r.curves,
                out,
                title=f"attention knockout, window {r.window} ({r.label})",
                ylabel="relative change of P(O)",
                hline=0.0,
            )
        ]
    lines = [f"attention knockout, {r.label}, window {r.window}, P_clean {r.p_clean:.3f}"] + [
        f"  {name:24s} {grid(v)}" for name, v in r.curves.items()
    ]
    names = list(r.curves)
    matrices = [
        Matrix(
            "relative change of P(O)",
            [r.curves[n] for n in names],
            names,
            _layers(len(next(iter(r.curves.values()))) if r.curves else 0),
        )
    ]
    return Report("knockout", d, lines, matrices, _scalars(d, "p_clean"), figures=figures)


def _module_attribution(vlm: VLM, cases, options: dict, out, case_progress, cell_progress) -> Report:
    from .attribution import average_modules, module_attribution
    from .render import render_bars

    results = _each(
        cases,
        lambda c, cells: module_attribution(vlm, c, mode=options.get("engine", "batched")),
        case_progress,
        cell_progress,
    )
    r = results[0] if len(results) == 1 else average_modules(results)
    d = r.to_dict()
    cols = _layers(len(r.mlp))
    figures = []
    if out is not None:
        figures = [
            render_bars(
                {"attention": r.attention, "MLP": r.mlp},
                cols,
                out,
                title=f"module-output contribution to the key token ({r.label})",
                ylabel="contribution C",
            )
        ]
    lines = [f"module-output attribution, {r.label}", "  attention " + grid(r.attention), "  MLP       " + grid(r.mlp)]
    matrices = [Matrix("module-output contribution", [r.attention, r.mlp], ["attention", "MLP"], cols)]
    return Report("module-attribution", d, lines, matrices, {}, figures=figures)


def _visual_attribution(vlm: VLM, cases, options: dict, out, case_progress, cell_progress) -> Report:
    from PIL import Image

    from vlm.images import load_image

    from .attribution import average_visual, visual_attribution
    from .render import render_image_maps

    results = _each(
        cases,
        lambda c, cells: visual_attribution(
            vlm,
            c,
            layers=options.get("layers"),
            samples=options.get("samples", 3),
            noise_scale=options.get("noise_scale", 3.0),
            seed=options.get("seed", 0),
            mode=options.get("engine", "batched"),
            batch_size=options.get("batch_size", 128),
            progress=cells,
        ),
        case_progress,
        cell_progress,
    )
    r = results[0] if len(results) == 1 else average_visual(results)
    if len(results) == 1 and not isinstance(cases[0].image, (str, os.PathLike)):
        r.image = None  # bytes or a PIL image: nothing to name in the JSON
    d = r.to_dict()
    figures = []
    if out is not None:
        if len(results) == 1 and cases[0].image is not None:
            img = load_image(cases[0].image)
        else:
            img = Image.new("RGB", (64, 64), "white")
        figures = [
            render_image_maps(
                img,
                r.maps,
                [f"layer {l} (max {max(m):.3f})" for l, m in zip(r.layers, r.maps)],
                out,
                tuple(r.grid),
                title=f"visual-representation attribution ({r.label})",
            )
        ]
    lines = [f"visual-representation attribution, {r.label} (grid {r.grid[0]}x{r.grid[1]})"] + [
        f"  layer {l}: mean {sum(m) / len(m):.4f}, max {max(m):.4f} at patch {m.index(max(m))}"
        for l, m in zip(r.layers, r.maps)
    ]
    matrices = [
        Matrix(
            "visual-representation attribution",
            r.maps,
            [f"layer {l}" for l in r.layers],
            [f"patch {i}" for i in range(len(r.maps[0]) if r.maps else 0)],
        )
    ]
    return Report("visual-attribution", d, lines, matrices, {}, figures=figures)


def _recommend(vlm: VLM, cases, options: dict, out, case_progress, cell_progress) -> Report:
    from .recommend import LAYER_RULES
    from .render import render_bars

    rule = options.get("editor") or "both"  # a rule's name (``editors.layer_rule`` maps an editor to its rule)
    if rule != "both" and rule not in LAYER_RULES:
        raise DiagnosticError(f"the layer rule must be {', '.join(LAYER_RULES)} or both, not {rule!r}")
    recs = [
        choose(vlm, cases, progress=case_progress) for name, choose in LAYER_RULES.items() if rule in (name, "both")
    ]
    d = {r.editor: r.to_dict() for r in recs}
    figures = []
    if out is not None:
        groups = {f"{r.editor} score": r.scores for r in recs}
        figures = [
            render_bars(
                groups,
                _layers(vlm.num_layers),
                out,
                title="layer recommendation: "
                + ", ".join(f"{r.editor} -> {r.layer if r.localised else 'none (nothing localised)'}" for r in recs),
            )
        ]
    lines = [
        f"{r.editor}: "
        + (f"layer {r.layer}" if r.localised else "no layer recommended")
        + f"  ({r.criterion})\n  scores {grid(r.scores)}"
        for r in recs
    ]
    matrices = [Matrix("layer score", [r.scores for r in recs], [r.editor for r in recs], _layers(vlm.num_layers))]
    layer = recs[0].layer if recs[0].localised else None
    return Report("recommend", d, lines, matrices, {}, layer, [r.to_dict() for r in recs], figures=figures)


_RUNNERS = {
    "trace": _trace,
    "noise-trace": _noise_trace,
    "knockout": _knockout,
    "contributions": _contributions,
    "module-attribution": _module_attribution,
    "visual-attribution": _visual_attribution,
    "recommend": _recommend,
}


def run_diagnostic(
    vlm: VLM,
    name: str,
    cases: Sequence[DiagnosticCase],
    options: dict | None = None,
    out: str | os.PathLike | None = None,
    case_progress: Progress | None = None,
    cell_progress: Progress | None = None,
) -> Report:
    """Run diagnostic ``name`` (one of ``DIAGNOSTICS``) over ``cases`` (averaged when several).

    ``options`` are the diagnostic's keyword options by the CLI's names (kinds,
    window, replacement, image_block, isolate, engine, batch_size, samples,
    noise_scale, seed, relations, regions, early_layers, layers, editor);
    unset ones take the CLI's defaults. With ``out`` the figure is rendered
    there (contributions also writes ``<out>-constraint.png`` and, over
    several cases, ``<out>-roc.png``). Raises ``DiagnosticError`` / ``VLMError``
    (with ``case_label`` set to the failing case's label) for bad input.
    """
    import time

    if name not in _RUNNERS:
        raise DiagnosticError(f"unknown diagnostic {name!r}; choose from {', '.join(DIAGNOSTICS)}")
    if not cases:
        raise DiagnosticError("a diagnostic needs at least one case")
    t0 = time.perf_counter()
    report = _RUNNERS[name](
        vlm, list(cases), dict(options or {}), Path(out) if out is not None else None, case_progress, cell_progress
    )
    report.seconds = time.perf_counter() - t0
    return report
