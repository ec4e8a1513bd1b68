"""``editlens diagnose ...``: the diagnostics on a local model, one case or averaged over a case file,
or (``--server``) on a running server.

A single case is ``--image --question --constraint`` (``--answer`` to follow
another answer than the model's own); ``--cases FILE`` takes a JSON list in
the world's edit-case format and averages over its records (``--limit``,
``--variant``). Every command prints a summary (or ``--json``) and renders a
PNG with ``--out``. The work itself is ``diagnostics.report.run_diagnostic``,
which the server's Diagnose call runs too; with ``--server HOST:PORT`` one
case is diagnosed on the server's model with its live version (or
``--adapter/--version/--base``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import typer

from .cli_support import console, fail, load_model, progress_bar
from .options import DEVICE, DTYPE, JSON, MODEL
from .service_cli import remote_diagnose

diagnose_app = typer.Typer(
    help="Causal traces, attention contributions and knockout, attributions and layer "
    "recommendation on a local model (one case, or averaged over a case file).",
    no_args_is_help=True,
)

# the options every diagnose command shares
IMAGE = typer.Option(None, help="The image of a single case.")
QUESTION = typer.Option(None, help="The question of a single case.")
CONSTRAINT = typer.Option(None, help="The visual constraint as it occurs in the question ('this landmark').")
ANSWER = typer.Option(None, help="Follow this answer (its first token) instead of the model's prediction.")
CASES = typer.Option(None, help="A JSON file of edit cases (the world's format): average over them.")
LIMIT = typer.Option(None, help="Use only the first N records of --cases.")
VARIANT = typer.Option(
    None, help="Case variant(s) of each record: src, rephrase, image_rephrase, image_heldout (default: src)."
)
OUT = typer.Option(None, help="Render the figure to this PNG file.")
ENGINE = typer.Option("batched", help="batched (cached prefix, many cells per pass) or naive (the reference).")
BATCH = typer.Option(64, help="Cells per forward pass (batched engine).")
SERVER = typer.Option(None, "--server", help="Diagnose one case on this server (host:port) instead of locally.")
ADAPTER = typer.Option(None, "--adapter", help="With --server: the adapter whose live version is diagnosed.")
VERSION = typer.Option(None, "--version", help="With --server: diagnose this version instead of the live one.")
BASE = typer.Option(False, "--base", help="With --server: diagnose the base model, without edits.")


def _cases(vlm, image, question, constraint, answer, cases, limit, variant):
    from diagnostics.cases import DiagnosticCase, load_cases
    from vlm.world.folder import WorldFolder

    if cases is not None:
        if any(v is not None for v in (image, question, constraint)):
            fail("give either --cases or --image/--question/--constraint, not both")
        return load_cases(
            cases, variants=variant or ["src"], limit=limit, vlm=vlm, answer="model" if answer is None else answer
        )
    missing = [n for n, v in (("--image", image), ("--question", question), ("--constraint", constraint)) if v is None]
    if missing:
        fail(f"a single case needs {', '.join(missing)} (or pass --cases FILE)")
    if not image.is_file():
        fail(f"image not found: {image}")
    world = WorldFolder.of_model(vlm)  # the causal trace's replacements: only a world's own model has them
    return [
        DiagnosticCase(
            question,
            constraint,
            image=image,
            answer=answer,
            label=image.name,
            replacements=world.phrases() if world is not None else [],
        )
    ]


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


def _emit(result: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        for line in lines:
            typer.echo(line)


def _check_out(out: Path | None) -> None:
    if out is not None and out.suffix.lower() != ".png":
        fail(f"--out must end in .png, not {out.name!r}")


def _setup(model, device, dtype, out):
    _check_out(out)
    return console(), load_model(model, device, dtype)


def _diagnose(
    name: str,
    what: str,
    case_args: tuple,
    options: dict,
    model,
    device,
    dtype,
    out,
    as_json,
    remote: tuple = (None, None, None, False),
    remote_options: dict | None = None,
    wrote_line: bool = False,
    request_variants: tuple | None = None,
) -> None:
    """Run ``name`` locally (one case or a case file) or, with ``--server``, remotely, and print it."""
    from diagnostics.report import run_diagnostic
    from vlm import VLMError

    image, question, constraint, answer, cases, limit, variant = case_args
    server, adapter, version, base = remote
    if server is not None:
        if cases is not None:
            fail(
                "--cases runs locally; a remote diagnostic (--server) takes one case (--image --question --constraint)"
            )
        if model is not None:
            fail("--model applies to local diagnostics; the server diagnoses its own model")
        _check_out(out)
        rephrase, image_rephrase = request_variants or (None, None)
        return remote_diagnose(
            server,
            name,
            image,
            question,
            constraint,
            answer,
            out,
            as_json,
            adapter=adapter,
            version=version,
            base=base,
            rephrase=rephrase,
            image_rephrase=image_rephrase,
            **(remote_options if remote_options is not None else options),
        )
    if adapter is not None or version is not None or base:
        fail("--adapter, --version and --base apply to remote diagnostics (--server)")
    console, vlm = _setup(model, device, dtype, out)
    cs = _cases(vlm, image, question, constraint, answer, cases, limit, variant)
    if request_variants is not None and cases is None and any(request_variants):
        from diagnostics.recommend import request_cases

        rephrase, image_rephrase = request_variants
        if image_rephrase is not None and not image_rephrase.is_file():
            fail(f"image not found: {image_rephrase}")
        cs = request_cases(
            question,
            constraint,
            image,
            rephrase=rephrase,
            image_rephrase=image_rephrase,
            replacements=cs[0].replacements,
        )
        for c in cs:
            c.answer = answer
    with _run(console, what, len(cs)) as (case_done, cells):
        try:
            report = run_diagnostic(vlm, name, cs, options, out, case_done, cells)
        except VLMError as exc:
            label = getattr(exc, "case_label", None)
            fail(f"{label}: {exc}" if label else str(exc))
    d = dict(report.data)
    if out is not None and report.figures:
        paths = [str(p) for p in report.figures]
        d["png"] = paths if name == "contributions" else paths[0]
    _emit(d, as_json, report.lines + ([f"wrote {out}"] if wrote_line and out is not None else []))


@diagnose_app.command("trace")
def trace_cmd(
    image: Path | None = IMAGE,
    question: str | None = QUESTION,
    constraint: str | None = CONSTRAINT,
    answer: str | None = ANSWER,
    cases: Path | None = CASES,
    limit: int | None = LIMIT,
    variant: list[str] | None = VARIANT,
    kind: list[str] | None = typer.Option(None, help="State kinds to restore: hidden, mlp, attn (default: all)."),
    window: int = typer.Option(1, help="Layers restored around each layer (the paper: 1 suffices, 3 is steadier)."),
    replace: str | None = typer.Option(
        None,
        "--replace",
        help="The phrase that replaces the constraint (same "
        "token length; default: the fitting named entity that lowers P(O) most).",
    ),
    image_block: int | None = typer.Option(None, help="Image tokens per block row (default: one patch-grid row)."),
    isolate: bool = typer.Option(
        False,
        help="Restore one layer's MLP/attention output while the same module at "
        "the other layers keeps its corrupted output (credits the module's own output).",
    ),
    engine: str = ENGINE,
    batch_size: int = BATCH,
    model: Path | None = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    out: Path | None = OUT,
    as_json: bool = JSON,
    server: str | None = SERVER,
    adapter: str | None = ADAPTER,
    version: int | None = VERSION,
    base: bool = BASE,
) -> None:
    """Causal trace by token replacement (MultiModalCausalTrace): restore clean states into the run whose
    constraint was replaced; indirect effect P_restored(O) - P_corrupt(O) per token/image block × layer."""
    opts = {"kinds": kind, "window": window, "replacement": replace, "image_block": image_block, "isolate": isolate}
    _diagnose(
        "trace",
        "trace",
        (image, question, constraint, answer, cases, limit, variant),
        {**opts, "engine": engine, "batch_size": batch_size},
        model,
        device,
        dtype,
        out,
        as_json,
        (server, adapter, version, base),
        opts,
        wrote_line=True,
    )


@diagnose_app.command("noise-trace")
def noise_trace_cmd(
    image: Path | None = IMAGE,
    question: str | None = QUESTION,
    constraint: str | None = CONSTRAINT,
    answer: str | None = ANSWER,
    cases: Path | None = CASES,
    limit: int | None = LIMIT,
    variant: list[str] | None = VARIANT,
    kind: list[str] | None = typer.Option(None, help="State kinds to restore: hidden, mlp, attn (default: all)."),
    window: int = typer.Option(1, help="Layers restored around each layer."),
    samples: int = typer.Option(5, help="Noise draws per cell (fixed seed)."),
    noise_scale: float = typer.Option(3.0, help="Noise std in units of the noised embeddings' std (ROME: 3)."),
    seed: int = typer.Option(0, help="Noise seed."),
    image_block: int | None = typer.Option(None, help="Image tokens per block row (default: one patch-grid row)."),
    engine: str = ENGINE,
    batch_size: int = BATCH,
    model: Path | None = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    out: Path | None = OUT,
    as_json: bool = JSON,
    server: str | None = SERVER,
    adapter: str | None = ADAPTER,
    version: int | None = VERSION,
    base: bool = BASE,
) -> None:
    """ROME's Gaussian-noise causal trace (the baseline): noise on the visual tokens' and the constraint's
    embeddings, clean states restored; the same grid as `trace`."""
    opts = {
        "kinds": kind,
        "window": window,
        "samples": samples,
        "noise_scale": noise_scale,
        "seed": seed,
        "image_block": image_block,
    }
    _diagnose(
        "noise-trace",
        "noise trace",
        (image, question, constraint, answer, cases, limit, variant),
        {**opts, "engine": engine, "batch_size": batch_size},
        model,
        device,
        dtype,
        out,
        as_json,
        (server, adapter, version, base),
        opts,
        wrote_line=True,
    )


@diagnose_app.command("contributions")
def contributions_cmd(
    image: Path | None = IMAGE,
    question: str | None = QUESTION,
    constraint: str | None = CONSTRAINT,
    answer: str | None = ANSWER,
    cases: Path | None = CASES,
    limit: int | None = LIMIT,
    variant: list[str] | None = VARIANT,
    early_layer: list[int] | None = typer.Option(
        None, help="Middle layers of the early-failure score (default: the two at half depth)."
    ),
    engine: str = ENGINE,
    model: Path | None = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    out: Path | None = OUT,
    as_json: bool = JSON,
    server: str | None = SERVER,
    adapter: str | None = ADAPTER,
    version: int | None = VERSION,
    base: bool = BASE,
) -> None:
    """Attention contributions (Basu eq. 1-2): visual tokens -> the constraint's last token and constraint
    tokens -> the last position, per layer; the early-failure score beside the model's confidence, with
    their AUROC for correct vs incorrect answers over --cases. --out writes the visual view, and
    <out>-constraint.png and <out>-roc.png beside it."""
    _diagnose(
        "contributions",
        "contributions",
        (image, question, constraint, answer, cases, limit, variant),
        {"early_layers": early_layer, "engine": engine},
        model,
        device,
        dtype,
        out,
        as_json,
        (server, adapter, version, base),
        {"layers": early_layer},
    )


@diagnose_app.command("knockout")
def knockout_cmd(
    image: Path | None = IMAGE,
    question: str | None = QUESTION,
    constraint: str | None = CONSTRAINT,
    answer: str | None = ANSWER,
    cases: Path | None = CASES,
    limit: int | None = LIMIT,
    variant: list[str] | None = VARIANT,
    relation: list[str] | None = typer.Option(
        None,
        help="image->question, image->last, question->last, last->last, region->question (default: the first four).",
    ),
    region: list[str] | None = typer.Option(
        None,
        help="For region->question: image patch indices, e.g. '0,1,4,5' (repeatable; default: each patch-grid row).",
    ),
    window: int = typer.Option(3, help="Layers blocked around each layer."),
    engine: str = ENGINE,
    batch_size: int = BATCH,
    model: Path | None = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    out: Path | None = OUT,
    as_json: bool = JSON,
    server: str | None = SERVER,
    adapter: str | None = ADAPTER,
    version: int | None = VERSION,
    base: bool = BASE,
) -> None:
    """Attention knockout (Zhang et al.): block target -> source attention in a window of layers around each
    layer; relative change of P(O) per layer and relation."""
    try:
        regions = [[int(x) for x in r.split(",") if x.strip()] for r in region] if region else None
    except ValueError:
        fail("--region takes comma-separated patch indices, e.g. '0,1,4,5'")
    if regions and server is not None:
        fail("--region is available locally only")
    _diagnose(
        "knockout",
        "knockout",
        (image, question, constraint, answer, cases, limit, variant),
        {"relations": relation, "regions": regions, "window": window, "engine": engine, "batch_size": batch_size},
        model,
        device,
        dtype,
        out,
        as_json,
        (server, adapter, version, base),
        {"relations": relation, "window": window},
    )


@diagnose_app.command("module-attribution")
def module_attribution_cmd(
    image: Path | None = IMAGE,
    question: str | None = QUESTION,
    constraint: str | None = CONSTRAINT,
    answer: str | None = ANSWER,
    cases: Path | None = CASES,
    limit: int | None = LIMIT,
    variant: list[str] | None = VARIANT,
    engine: str = ENGINE,
    model: Path | None = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    out: Path | None = OUT,
    as_json: bool = JSON,
    server: str | None = SERVER,
    adapter: str | None = ADAPTER,
    version: int | None = VERSION,
    base: bool = BASE,
) -> None:
    """Module-output attribution (VisEdit eq. 3-5): each layer's attention and MLP output at the last position
    read through the unembedding; C = sqrt(P(key token) x normalised logit)."""
    _diagnose(
        "module-attribution",
        "attribution",
        (image, question, constraint, answer, cases, limit, variant),
        {"engine": engine},
        model,
        device,
        dtype,
        out,
        as_json,
        (server, adapter, version, base),
        {},
    )


@diagnose_app.command("visual-attribution")
def visual_attribution_cmd(
    image: Path | None = IMAGE,
    question: str | None = QUESTION,
    constraint: str | None = CONSTRAINT,
    answer: str | None = ANSWER,
    cases: Path | None = CASES,
    limit: int | None = LIMIT,
    variant: list[str] | None = VARIANT,
    layer: list[int] | None = typer.Option(None, help="Layers to attribute (default: all)."),
    samples: int = typer.Option(3, help="Noise draws per visual token."),
    noise_scale: float = typer.Option(3.0, help="Noise std in units of the visual states' std (paper: 3)."),
    seed: int = typer.Option(0, help="Noise seed."),
    engine: str = ENGINE,
    batch_size: int = typer.Option(128, help="Cells per forward pass (batched engine)."),
    model: Path | None = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    out: Path | None = OUT,
    as_json: bool = JSON,
    server: str | None = SERVER,
    adapter: str | None = ADAPTER,
    version: int | None = VERSION,
    base: bool = BASE,
) -> None:
    """Visual-representation attribution (VisEdit eq. 6-8): noise on one visual state at a layer's input;
    (1 - cos) / 2 of the last position's attention output; a heatmap over the image's patch grid per layer."""
    opts = {"layers": layer, "samples": samples, "noise_scale": noise_scale, "seed": seed}
    _diagnose(
        "visual-attribution",
        "visual attribution",
        (image, question, constraint, answer, cases, limit, variant),
        {**opts, "engine": engine, "batch_size": batch_size},
        model,
        device,
        dtype,
        out,
        as_json,
        (server, adapter, version, base),
        opts,
    )


@diagnose_app.command("recommend")
def recommend_cmd(
    image: Path | None = IMAGE,
    question: str | None = QUESTION,
    constraint: str | None = CONSTRAINT,
    answer: str | None = ANSWER,
    cases: Path | None = CASES,
    limit: int | None = LIMIT,
    variant: list[str] | None = VARIANT,
    rephrase: str | None = typer.Option(None, help="Single case: the question reworded (averaged in)."),
    image_rephrase: Path | None = typer.Option(None, help="Single case: another image of the subject."),
    editor: str = typer.Option(
        "both",
        help="The editor whose layer to recommend: any that picks it by a diagnostic (keygate, alphaedit, "
        "multedit: the causal trace's MLP peak; visedit: the VEAD rule), or both (MultEdit's and VisEdit's).",
    ),
    model: Path | None = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    out: Path | None = OUT,
    as_json: bool = JSON,
    server: str | None = SERVER,
    adapter: str | None = ADAPTER,
    version: int | None = VERSION,
    base: bool = BASE,
) -> None:
    """The layer to edit, with the scores that chose it: MultEdit's (peak early MLP indirect effect at the
    constraint's last token, over the request's variants) and VisEdit's VEAD layer (before the high
    module-contribution layers, or the deepest layer whose visual states the answer still reads)."""
    from editors import layer_rule

    try:
        rule = layer_rule(editor)
    except ValueError as exc:
        fail(str(exc))
    _diagnose(
        "recommend",
        "recommend",
        (image, question, constraint, answer, cases, limit, variant),
        {"editor": rule},
        model,
        device,
        dtype,
        out,
        as_json,
        (server, adapter, version, base),
        {"editor": editor},
        request_variants=(rephrase, image_rephrase),
    )
