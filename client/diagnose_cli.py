"""``editlens diagnose ...``: the diagnostics on a local model, one case or averaged over a case file.

A single case is ``--image --question --constraint`` (``--answer`` to follow
another answer than the model's own); ``--cases FILE`` takes a JSON list in
the world's edit-case format and averages over its records (``--limit``,
``--variant``). Every command prints a summary (or ``--json``) and renders a
PNG with ``--out``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, List, Optional

import typer

from .cli_support import default_model_dir, fail, load_model, progress_bar

diagnose_app = typer.Typer(help="Causal traces, attention contributions and knockout, attributions and layer "
                                "recommendation on a local model (one case, or averaged over a case file).",
                           no_args_is_help=True)

# the options every diagnose command shares
IMAGE = typer.Option(None, help="The image of a single case.")
QUESTION = typer.Option(None, help="The question of a single case.")
CONSTRAINT = typer.Option(None, help="The visual constraint as it occurs in the question ('this landmark').")
ANSWER = typer.Option(None, help="Follow this answer (its first token) instead of the model's prediction.")
CASES = typer.Option(None, help="A JSON file of edit cases (the world's format): average over them.")
LIMIT = typer.Option(None, help="Use only the first N records of --cases.")
VARIANT = typer.Option(None, help="Case variant(s) of each record: src, rephrase, image_rephrase, image_heldout "
                                  "(default: src).")
MODEL = typer.Option(None, help="Model folder (default: the embedded world model).")
DEVICE = typer.Option("auto", help="auto, cpu or cuda.")
DTYPE = typer.Option("auto", help="auto, float32, bfloat16 or float16.")
OUT = typer.Option(None, help="Render the figure to this PNG file.")
JSON = typer.Option(False, "--json", help="Print the numbers and labels as JSON on stdout.")
ENGINE = typer.Option("batched", help="batched (cached prefix, many cells per pass) or naive (the reference).")
BATCH = typer.Option(64, help="Cells per forward pass (batched engine).")


def _cases(vlm, image, question, constraint, answer, cases, limit, variant):
    from diagnostics.cases import DiagnosticCase, load_cases, world_phrases

    if cases is not None:
        if any(v is not None for v in (image, question, constraint)):
            fail("give either --cases or --image/--question/--constraint, not both")
        return load_cases(cases, variants=variant or ["src"], limit=limit, vlm=vlm,
                          answer="model" if answer is None else answer)
    missing = [n for n, v in (("--image", image), ("--question", question), ("--constraint", constraint)) if v is None]
    if missing:
        fail(f"a single case needs {', '.join(missing)} (or pass --cases FILE)")
    if not image.is_file():
        fail(f"image not found: {image}")
    return [DiagnosticCase(question, constraint, image=image, answer=answer, label=image.name,
                           replacements=world_phrases(Path(vlm.path).parent))]


@contextmanager
def _run(console, what: str, n_cases: int):
    """A progress bar; yields (case_progress, cell_progress) callbacks."""
    with progress_bar(console) as bar:
        task = bar.add_task(what, total=None, info="")
        state = {"case": 0}

        def case_done(done: int, total: int) -> None:
            state["case"] = done
            bar.update(task, completed=done, total=total, info=f"{n_cases} case(s)")

        def cells(done: int, total: int) -> None:
            if n_cases == 1:
                bar.update(task, completed=done, total=total, info="cells")

        yield case_done, cells


def _each(vlm, cases, fn: Callable, console, what: str):
    from vlm import VLMError

    out = []
    with _run(console, what, len(cases)) as (case_done, cells):
        for i, case in enumerate(cases):
            try:
                out.append(fn(case, cells))
            except VLMError as exc:
                fail(f"{case.label or 'case'}: {exc}")
            case_done(i + 1, len(cases))
    return out


def _emit(result: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        for line in lines:
            typer.echo(line)


def _check_out(out: Optional[Path]) -> None:
    if out is not None and out.suffix.lower() != ".png":
        fail(f"--out must end in .png, not {out.name!r}")


def _grid(values: list[float]) -> str:
    return " ".join(f"{v:6.3f}" for v in values)


def _trace_lines(r) -> list[str]:
    lines = [f"{r.method} trace, {r.label}: P_clean {r.p_clean:.3f}, P_corrupt {r.p_corrupt:.3f}, window {r.window}"
             + (f", replacement {r.replacement!r}" if r.replacement else "")]
    for kind in r.kinds:
        lines.append(f"  {kind} indirect effect per layer (rows: tokens; * constraint)")
        for row, vals in zip(r.rows, r.effects[kind]):
            lines.append(f"    {row.label[:22] + ('*' if row.constraint else ''):24s} {_grid(vals)}")
    return lines


def _setup(model, device, dtype, out):
    from rich.console import Console

    _check_out(out)
    return Console(stderr=True), load_model(model, device, dtype)


@diagnose_app.command("trace")
def trace_cmd(
    image: Optional[Path] = IMAGE, question: Optional[str] = QUESTION, constraint: Optional[str] = CONSTRAINT,
    answer: Optional[str] = ANSWER, cases: Optional[Path] = CASES, limit: Optional[int] = LIMIT,
    variant: Optional[List[str]] = VARIANT,
    kind: Optional[List[str]] = typer.Option(None, help="State kinds to restore: hidden, mlp, attn (default: all)."),
    window: int = typer.Option(1, help="Layers restored around each layer (the paper: 1 suffices, 3 is steadier)."),
    replace: Optional[str] = typer.Option(None, "--replace", help="The phrase that replaces the constraint (same "
                                          "token length; default: the fitting named entity that lowers P(O) most)."),
    image_block: Optional[int] = typer.Option(None, help="Image tokens per block row (default: one patch-grid row)."),
    isolate: bool = typer.Option(False, help="Restore one layer's MLP/attention output while the same module at "
                                 "the other layers keeps its corrupted output (credits the module's own output)."),
    engine: str = ENGINE, batch_size: int = BATCH, model: Optional[Path] = MODEL, device: str = DEVICE,
    dtype: str = DTYPE, out: Optional[Path] = OUT, as_json: bool = JSON,
) -> None:
    """Causal trace by token replacement (MultiModalCausalTrace): restore clean states into the run whose
    constraint was replaced; indirect effect P_restored(O) - P_corrupt(O) per token/image block × layer."""
    from diagnostics.trace import average_traces, causal_trace

    console, vlm = _setup(model, device, dtype, out)
    cs = _cases(vlm, image, question, constraint, answer, cases, limit, variant)
    results = _each(vlm, cs, lambda c, cells: causal_trace(
        vlm, c, kinds=kind or ["hidden", "mlp", "attn"], window=window, replacement=replace,
        image_block=image_block, isolate=isolate, mode=engine, batch_size=batch_size, progress=cells), console,
        "trace")
    _finish_trace(results, average_traces, out, as_json)


@diagnose_app.command("noise-trace")
def noise_trace_cmd(
    image: Optional[Path] = IMAGE, question: Optional[str] = QUESTION, constraint: Optional[str] = CONSTRAINT,
    answer: Optional[str] = ANSWER, cases: Optional[Path] = CASES, limit: Optional[int] = LIMIT,
    variant: Optional[List[str]] = VARIANT,
    kind: Optional[List[str]] = typer.Option(None, help="State kinds to restore: hidden, mlp, attn (default: all)."),
    window: int = typer.Option(1, help="Layers restored around each layer."),
    samples: int = typer.Option(5, help="Noise draws per cell (fixed seed)."),
    noise_scale: float = typer.Option(3.0, help="Noise std in units of the noised embeddings' std (ROME: 3)."),
    seed: int = typer.Option(0, help="Noise seed."),
    image_block: Optional[int] = typer.Option(None, help="Image tokens per block row (default: one patch-grid row)."),
    engine: str = ENGINE, batch_size: int = BATCH, model: Optional[Path] = MODEL, device: str = DEVICE,
    dtype: str = DTYPE, out: Optional[Path] = OUT, as_json: bool = JSON,
) -> None:
    """ROME's Gaussian-noise causal trace (the baseline): noise on the visual tokens' and the constraint's
    embeddings, clean states restored; the same grid as `trace`."""
    from diagnostics.trace import average_traces, noise_trace

    console, vlm = _setup(model, device, dtype, out)
    cs = _cases(vlm, image, question, constraint, answer, cases, limit, variant)
    results = _each(vlm, cs, lambda c, cells: noise_trace(
        vlm, c, kinds=kind or ["hidden", "mlp", "attn"], window=window, samples=samples, noise_scale=noise_scale,
        seed=seed, image_block=image_block, mode=engine, batch_size=batch_size, progress=cells), console,
        "noise trace")
    _finish_trace(results, average_traces, out, as_json)


def _finish_trace(results, average, out, as_json) -> None:
    from diagnostics.render import render_trace

    r = results[0] if len(results) == 1 else average(results)
    d = r.to_dict()
    if out is not None:
        d["png"] = str(render_trace(r, out))
    _emit(d, as_json, _trace_lines(r) + ([f"wrote {out}"] if out else []))


@diagnose_app.command("contributions")
def contributions_cmd(
    image: Optional[Path] = IMAGE, question: Optional[str] = QUESTION, constraint: Optional[str] = CONSTRAINT,
    answer: Optional[str] = ANSWER, cases: Optional[Path] = CASES, limit: Optional[int] = LIMIT,
    variant: Optional[List[str]] = VARIANT,
    early_layer: Optional[List[int]] = typer.Option(None, help="Middle layers of the early-failure score "
                                                    "(default: the two at half depth)."),
    engine: str = ENGINE, model: Optional[Path] = MODEL, device: str = DEVICE, dtype: str = DTYPE,
    out: Optional[Path] = OUT, as_json: bool = JSON,
) -> None:
    """Attention contributions (Basu eq. 1-2): visual tokens -> the constraint's last token and constraint
    tokens -> the last position, per layer; the early-failure score beside the model's confidence, with
    their AUROC for correct vs incorrect answers over --cases. --out writes the visual view, and
    <out>-constraint.png and <out>-roc.png beside it."""
    from diagnostics.attention import attention_contributions, average_contributions
    from diagnostics.render import render_matrix, render_roc

    console, vlm = _setup(model, device, dtype, out)
    cs = _cases(vlm, image, question, constraint, answer, cases, limit, variant)
    results = _each(vlm, cs, lambda c, cells: attention_contributions(vlm, c, early_layer, mode=engine), console,
                    "contributions")
    r = results[0] if len(results) == 1 else average_contributions(results)
    d = r.to_dict()
    L = vlm.num_layers
    if out is not None:
        cols = [str(l) for l in range(L)]
        d["png"] = [str(render_matrix(r.visual, [f"image {i}" for i in range(len(r.visual))], cols, out,
                                      title=f"visual tokens -> constraint's last token ({r.label})",
                                      colorbar_label="attention contribution")),
                    str(render_matrix(r.constraint, r.constraint_tokens, cols, out.with_name(out.stem + "-constraint.png"),
                                      title=f"constraint tokens -> last position ({r.label})",
                                      colorbar_label="attention contribution", cmap="Reds"))]
        if r.roc:
            d["png"].append(str(render_roc({k: (*r.roc[k], r.auroc[k]) for k in r.roc},
                                           out.with_name(out.stem + "-roc.png"), title="correct vs incorrect answers")))
    lines = [f"attention contributions, {r.label}",
             "  visual tokens -> constraint's last token, mean over tokens per layer: "
             + _grid([sum(col) / len(col) for col in zip(*r.visual)]),
             "  constraint's last token -> last position per layer: " + _grid(r.constraint[-1]),
             f"  early-failure score (layers {r.early_layers}): {r.early_score:.3f}; confidence {r.confidence:.3f}"]
    if r.auroc:
        lines.append(f"  AUROC over {r.cases} cases: early-failure score {r.auroc['early_score']:.3f}, "
                     f"confidence {r.auroc['confidence']:.3f}")
    _emit(d, as_json, lines)


@diagnose_app.command("knockout")
def knockout_cmd(
    image: Optional[Path] = IMAGE, question: Optional[str] = QUESTION, constraint: Optional[str] = CONSTRAINT,
    answer: Optional[str] = ANSWER, cases: Optional[Path] = CASES, limit: Optional[int] = LIMIT,
    variant: Optional[List[str]] = VARIANT,
    relation: Optional[List[str]] = typer.Option(None, help="image->question, image->last, question->last, "
                                                 "last->last, region->question (default: the first four)."),
    region: Optional[List[str]] = typer.Option(None, help="For region->question: image patch indices, e.g. "
                                               "'0,1,4,5' (repeatable; default: each patch-grid row)."),
    window: int = typer.Option(3, help="Layers blocked around each layer."),
    engine: str = ENGINE, batch_size: int = BATCH, model: Optional[Path] = MODEL, device: str = DEVICE,
    dtype: str = DTYPE, out: Optional[Path] = OUT, as_json: bool = JSON,
) -> None:
    """Attention knockout (Zhang et al.): block target -> source attention in a window of layers around each
    layer; relative change of P(O) per layer and relation."""
    from diagnostics.knockout import average_knockouts, knockout
    from diagnostics.render import render_curves

    try:
        regions = [[int(x) for x in r.split(",") if x.strip()] for r in region] if region else None
    except ValueError:
        fail("--region takes comma-separated patch indices, e.g. '0,1,4,5'")
    console, vlm = _setup(model, device, dtype, out)
    cs = _cases(vlm, image, question, constraint, answer, cases, limit, variant)
    results = _each(vlm, cs, lambda c, cells: knockout(
        vlm, c, relations=relation or ["image->question", "image->last", "question->last", "last->last"],
        window=window, regions=regions, mode=engine, batch_size=batch_size, progress=cells), console, "knockout")
    r = results[0] if len(results) == 1 else average_knockouts(results)
    d = r.to_dict()
    if out is not None:
        d["png"] = str(render_curves(r.curves, out, title=f"attention knockout, window {r.window} ({r.label})",
                                     ylabel="relative change of P(O)", hline=0.0))
    _emit(d, as_json, [f"attention knockout, {r.label}, window {r.window}, P_clean {r.p_clean:.3f}"]
          + [f"  {name:24s} {_grid(v)}" for name, v in r.curves.items()])


@diagnose_app.command("module-attribution")
def module_attribution_cmd(
    image: Optional[Path] = IMAGE, question: Optional[str] = QUESTION, constraint: Optional[str] = CONSTRAINT,
    answer: Optional[str] = ANSWER, cases: Optional[Path] = CASES, limit: Optional[int] = LIMIT,
    variant: Optional[List[str]] = VARIANT, engine: str = ENGINE, model: Optional[Path] = MODEL,
    device: str = DEVICE, dtype: str = DTYPE, out: Optional[Path] = OUT, as_json: bool = JSON,
) -> None:
    """Module-output attribution (VisEdit eq. 3-5): each layer's attention and MLP output at the last position
    read through the unembedding; C = sqrt(P(key token) x normalised logit)."""
    from diagnostics.attribution import average_modules, module_attribution
    from diagnostics.render import render_bars

    console, vlm = _setup(model, device, dtype, out)
    cs = _cases(vlm, image, question, constraint, answer, cases, limit, variant)
    results = _each(vlm, cs, lambda c, cells: module_attribution(vlm, c, mode=engine), console, "attribution")
    r = results[0] if len(results) == 1 else average_modules(results)
    d = r.to_dict()
    if out is not None:
        d["png"] = str(render_bars({"attention": r.attention, "MLP": r.mlp}, [str(l) for l in range(len(r.mlp))],
                                   out, title=f"module-output contribution to the key token ({r.label})",
                                   ylabel="contribution C"))
    _emit(d, as_json, [f"module-output attribution, {r.label}", "  attention " + _grid(r.attention),
                       "  MLP       " + _grid(r.mlp)])


@diagnose_app.command("visual-attribution")
def visual_attribution_cmd(
    image: Optional[Path] = IMAGE, question: Optional[str] = QUESTION, constraint: Optional[str] = CONSTRAINT,
    answer: Optional[str] = ANSWER, cases: Optional[Path] = CASES, limit: Optional[int] = LIMIT,
    variant: Optional[List[str]] = VARIANT,
    layer: Optional[List[int]] = typer.Option(None, help="Layers to attribute (default: all)."),
    samples: int = typer.Option(3, help="Noise draws per visual token."),
    noise_scale: float = typer.Option(3.0, help="Noise std in units of the visual states' std (paper: 3)."),
    seed: int = typer.Option(0, help="Noise seed."),
    engine: str = ENGINE, batch_size: int = typer.Option(128, help="Cells per forward pass (batched engine)."),
    model: Optional[Path] = MODEL, device: str = DEVICE, dtype: str = DTYPE, out: Optional[Path] = OUT,
    as_json: bool = JSON,
) -> None:
    """Visual-representation attribution (VisEdit eq. 6-8): noise on one visual state at a layer's input;
    (1 - cos) / 2 of the last position's attention output; a heatmap over the image's patch grid per layer."""
    from PIL import Image

    from diagnostics.attribution import average_visual, visual_attribution
    from diagnostics.render import render_image_maps

    console, vlm = _setup(model, device, dtype, out)
    cs = _cases(vlm, image, question, constraint, answer, cases, limit, variant)
    results = _each(vlm, cs, lambda c, cells: visual_attribution(
        vlm, c, layers=layer, samples=samples, noise_scale=noise_scale, seed=seed, mode=engine,
        batch_size=batch_size, progress=cells), console, "visual attribution")
    r = results[0] if len(results) == 1 else average_visual(results)
    d = r.to_dict()
    if out is not None:
        img = Image.open(r.image).convert("RGB") if r.image else Image.new("RGB", (64, 64), "white")
        d["png"] = str(render_image_maps(img, r.maps, [f"layer {l} (max {max(m):.3f})" for l, m in zip(r.layers, r.maps)],
                                         out, tuple(r.grid),
                                         title=f"visual-representation attribution ({r.label})"))
    _emit(d, as_json, [f"visual-representation attribution, {r.label} (grid {r.grid[0]}x{r.grid[1]})"]
          + [f"  layer {l}: mean {sum(m) / len(m):.4f}, max {max(m):.4f} at patch {m.index(max(m))}"
             for l, m in zip(r.layers, r.maps)])


@diagnose_app.command("recommend")
def recommend_cmd(
    image: Optional[Path] = IMAGE, question: Optional[str] = QUESTION, constraint: Optional[str] = CONSTRAINT,
    answer: Optional[str] = ANSWER, cases: Optional[Path] = CASES, limit: Optional[int] = LIMIT,
    variant: Optional[List[str]] = VARIANT,
    rephrase: Optional[str] = typer.Option(None, help="Single case: the question reworded (averaged in)."),
    image_rephrase: Optional[Path] = typer.Option(None, help="Single case: another image of the subject."),
    editor: str = typer.Option("both", help="multedit, visedit or both."),
    model: Optional[Path] = MODEL, device: str = DEVICE, dtype: str = DTYPE, out: Optional[Path] = OUT,
    as_json: bool = JSON,
) -> None:
    """The layer to edit, with the scores that chose it: MultEdit's (peak early MLP indirect effect at the
    constraint's last token, over the request's variants) and VisEdit's VEAD layer (before the high
    module-contribution layers)."""
    from diagnostics.recommend import recommend_multedit_layer, recommend_vead_layer, request_cases
    from diagnostics.render import render_bars
    from vlm import VLMError

    if editor not in ("multedit", "visedit", "both"):
        fail(f"--editor must be multedit, visedit or both, not {editor!r}")
    console, vlm = _setup(model, device, dtype, out)
    cs = _cases(vlm, image, question, constraint, answer, cases, limit, variant)
    if cases is None and (rephrase or image_rephrase):
        if image_rephrase is not None and not image_rephrase.is_file():
            fail(f"image not found: {image_rephrase}")
        cs = request_cases(question, constraint, image, rephrase=rephrase, image_rephrase=image_rephrase,
                           replacements=cs[0].replacements)
        for c in cs:
            c.answer = answer
    recs = []
    try:
        with _run(console, "recommend", len(cs)) as (case_done, _):
            if editor in ("multedit", "both"):
                recs.append(recommend_multedit_layer(vlm, cs, progress=case_done))
            if editor in ("visedit", "both"):
                recs.append(recommend_vead_layer(vlm, cs, progress=case_done))
    except VLMError as exc:
        fail(str(exc))
    d = {r.editor: r.to_dict() for r in recs}
    if out is not None:
        groups = {f"{r.editor} score": r.scores for r in recs}
        d["png"] = str(render_bars(groups, [str(l) for l in range(vlm.num_layers)], out,
                                   title="layer recommendation: " + ", ".join(f"{r.editor} -> {r.layer}" for r in recs)))
    _emit(d, as_json, [f"{r.editor}: layer {r.layer}  ({r.criterion})\n  scores {_grid(r.scores)}" for r in recs])


def default_world_cases() -> Path:
    """The embedded world's test cases (for examples in the help and README)."""
    return default_model_dir().parent / "edit_cases" / "test.json"
