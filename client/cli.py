"""The ``editlens`` command line.

This module is the composition root: the commands that work locally (world
build, ask) import the model layer lazily, so ``editlens --help`` stays fast
and the future remote commands need only the generated stubs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .cli_support import fail, load_model, progress_bar, world_and_model
from .diagnose_cli import diagnose_app
from .visedit_cli import visedit_app
from . import service_cli

app = typer.Typer(
    name="editlens",
    help="EditLens: edit and inspect LLaVA-family vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
world_app = typer.Typer(help="The synthetic VQA world and its tiny LLaVA (the embedded default model).",
                        no_args_is_help=True)
app.add_typer(world_app, name="world")
bench_app = typer.Typer(help="Benchmarks: figures next to a baseline or naive reference from the same run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(diagnose_app, name="diagnose")
app.add_typer(visedit_app, name="visedit")
service_cli.register(app)     # serve, generate, versions, promote, rollback, delete (the gRPC service)
bench_app.command("serve")(service_cli.bench_serve_cmd)


@world_app.command("build")
def world_build(
    seed: int = typer.Option(0, help="World seed: the same seed gives the same world and model."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: $EDITLENS_HOME/worlds/seed-N, "
                                                  "EDITLENS_HOME defaults to ~/.cache/editlens)."),
    force: bool = typer.Option(False, help="Rebuild even when a cached build with the same recipe exists."),
    steps: Optional[int] = typer.Option(None, help="Training steps (default: the recipe's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the build summary as JSON on stdout."),
) -> None:
    """Generate the world, train its tiny LLaVA and evaluate it (cached per seed)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from vlm.world import TrainConfig, build_world

    console = Console(stderr=True)
    train_cfg = TrainConfig(steps=steps) if steps else None
    if steps is not None and steps <= 0:
        fail("--steps must be positive")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("training", total=None, loss="-", visible=False)

        def stage(msg: str) -> None:
            console.print(f"[bold]·[/bold] {msg}")

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=f"{loss:.3f}", visible=True)

        try:
            summary = build_world(seed=seed, out=out, force=force, train_cfg=train_cfg, stage=stage, progress=progress)
        except (FileExistsError, ValueError) as exc:
            fail(str(exc))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}, indent=1))
        return
    typer.echo(("cached world" if summary["cached"] else "built world") + f" at {summary['path']}")
    for key in ("train_accuracy", "heldout_paraphrase_accuracy", "heldout_image_accuracy", "text_fact_accuracy",
                "multi_constraint_accuracy", "image_swap_change_rate"):
        typer.echo(f"  {key:30s} {summary[key]:.3f}")
    typer.echo(f"  {'build_seconds':30s} {summary['build_seconds']}")


@world_app.command("check")
def world_check(
    seed: int = typer.Option(0, help="Which built world (ignored with --world)."),
    world: Optional[Path] = typer.Option(None, help="World folder (default: $EDITLENS_HOME/worlds/seed-N)."),
    questions: int = typer.Option(200, help="Held-out visual questions for the attention knockouts."),
    cases: int = typer.Option(50, help="Counterfactual test edit cases for the rank-one edits."),
    layer: Optional[List[int]] = typer.Option(None, help="Layer(s) to edit (default: every early layer, "
                                                         "the first half of the decoder)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON on stdout."),
) -> None:
    """Check that the model recalls visual facts through the constraint tokens.

    Prints constraint_knockout_drop (relative drop of P(answer) when the
    constraint tokens may not attend to the image in any layer; target >= 0.5),
    last_knockout_drop (the same for the positions that predict the answer),
    and constraint_edit_success (share of counterfactual cases a rank-one edit
    of an early MLP at the constraint's last token, value unbounded, makes
    top-1; target >= 0.9) with the layer. Exit status 1 when a target is missed.
    """
    from rich.console import Console

    from editors.world_check import WorldCheckError, check_world
    from vlm import ModelLoadError, load_vlm
    from vlm.world import default_world_dir

    console = Console(stderr=True)
    folder = world or default_world_dir(seed)
    if not (folder / "model").is_dir():
        fail(f"{folder} holds no built world; run `editlens world build` (or pass --world PATH)")
    try:
        vlm = load_vlm(folder / "model", device=device)
        result = check_world(folder, vlm=vlm, questions=questions, cases=cases, layers=layer,
                             stage=lambda s: console.print(f"[bold]·[/bold] {s}"))
    except (WorldCheckError, ModelLoadError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        t = result["targets"]
        typer.echo(f"world check of {folder} ({result['questions']} questions, {result['cases']} edit cases)")
        typer.echo(f"  {'constraint_knockout_drop':26s} {result['constraint_knockout_drop']:.3f}"
                   f"   target >= {t['constraint_knockout_drop']}")
        typer.echo(f"  {'last_knockout_drop':26s} {result['last_knockout_drop']:.3f}   (LLaVA: small)")
        typer.echo(f"  {'constraint_edit_success':26s} {result['constraint_edit_success']:.3f}"
                   f"   target >= {t['constraint_edit_success']}, layer {result['constraint_edit_layer']}")
        for lyr, v in result["edit_by_layer"].items():
            typer.echo(f"    layer {lyr}: success {v['success']:.2f}, mean P(new) {v['mean_prob']:.3f}, "
                       f"mean |delta| {v['mean_delta_norm']:.1f}")
        typer.echo("passed" if result["passed"] else "FAILED: a target is missed")
    if not result["passed"]:
        raise typer.Exit(1)


@app.command("ask")
def ask_cmd(
    question: str = typer.Argument(..., help="The question, e.g. 'which city is this landmark in ?'"),
    image: Optional[Path] = typer.Option(None, help="Image file (omit for a text-only question)."),
    model: Optional[Path] = typer.Option(None, help="Model folder (default: the embedded world model)."),
    answer: Optional[str] = typer.Option(None, help="Also score this answer: teacher-forced log P and accuracy."),
    constraint: Optional[List[str]] = typer.Option(None, help="Constraint text(s) to locate in the question."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Answer one question with a local model (greedy), optionally scoring an answer."""
    from vlm import VLMError, encode, generate, score_answers

    vlm = load_model(model, device, dtype)
    try:
        prompt = encode(vlm.processor, question, image=image, constraints=constraint)
        result = {"question": question, "answer": generate(vlm, [prompt])[0]}
        toks = vlm.tokenizer.convert_ids_to_tokens(prompt.input_ids.tolist())
        result["constraints"] = [{"text": c, "tokens": toks[a:b], "span": [a, b]}
                                 for c, (a, b) in zip(constraint or [], prompt.constraint_spans)]
        if prompt.image_span:
            result["image_span"] = list(prompt.image_span)
        if answer is not None:
            scored = encode(vlm.processor, question, image=image, answer=answer)
            s = score_answers(vlm, [scored])[0]
            result["scored"] = {"answer": answer, "logprob": s.logprob, "prob": s.prob,
                                "token_accuracy": s.token_accuracy}
    except VLMError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(result["answer"])
    for c in result["constraints"]:
        typer.echo(f"  constraint {c['text']!r}: tokens {c['span'][0]}..{c['span'][1] - 1} {c['tokens']}")
    if "scored" in result:
        s = result["scored"]
        typer.echo(f"  P({answer!r}) = {s['prob']:.4f} (log {s['logprob']:.3f}), token accuracy {s['token_accuracy']:.2f}")


def _optional_float(value: Optional[float], name: str) -> Optional[float]:
    if value is not None and value <= 0:
        fail(f"{name} must be positive")
    return value


@app.command("edit")
def edit_cmd(
    image: Path = typer.Option(..., help="The edit image."),
    question: str = typer.Option(..., help="The question, e.g. 'which city is this landmark in ?'"),
    constraint: str = typer.Option(..., help="The visual constraint as it occurs in the question "
                                             "('this landmark'); the edit is made at its last token."),
    answer: str = typer.Option(..., help="The new answer."),
    layer: str = typer.Option("auto", help="Decoder layer whose MLP down projection is edited, or auto: the peak "
                                           "early MLP indirect effect of the causal trace (evidence stored in "
                                           "the edit set)."),
    rephrase: Optional[str] = typer.Option(None, help="The question reworded: --layer auto averages over it too."),
    image_rephrase: Optional[Path] = typer.Option(None, help="Another image of the subject: --layer auto "
                                                            "averages over it too."),
    out: Optional[Path] = typer.Option(None, help="Where to write the edit set (.safetensors; required locally)."),
    model: Optional[Path] = typer.Option(None, help="Model folder (default: the embedded world model)."),
    onto: Optional[Path] = typer.Option(None, help="An existing edit set: the new edit is computed on the model "
                                                   "with it applied, and --out holds both (sequential editing)."),
    lam: float = typer.Option(0.01, "--lambda", help="Ridge λ of the closed form (paper: 0.01)."),
    steps: int = typer.Option(100, help="Adam steps of the value optimisation, at most."),
    lr: float = typer.Option(0.1, help="Adam learning rate (paper: 0.1)."),
    lr_scale: str = typer.Option("residual", help="residual: --lr is in units of the residual stream's RMS at "
                                                  "the key (works across model scales); none: absolute."),
    max_norm: Optional[float] = typer.Option(None, help="Bound on the value change ‖δ‖ (default: none)."),
    target_prob: float = typer.Option(0.95, help="Stop the value optimisation once P(new answer) reaches this."),
    peft: Optional[Path] = typer.Option(None, help="Also export the edit set as a PEFT LoRA adapter folder."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    server: Optional[str] = typer.Option(None, help="Edit on this server (host:port) instead: the edit is a job "
                                                    "there, registered as a new version of --adapter (live unless "
                                                    "--no-promote); --out, --model, --onto, --peft do not apply."),
    token: Optional[str] = service_cli.TOKEN,
    adapter: Optional[str] = service_cli.ADAPTER,
    promote: bool = typer.Option(True, "--promote/--no-promote", help="With --server: make the new version live."),
    editor: str = typer.Option("multedit", help="With --server: multedit, or visedit (a signal of the trained "
                                                "VisEdit editor named by --visedit-adapter)."),
    visedit_adapter: Optional[str] = typer.Option(None, help="With --server --editor visedit: the adapter that holds "
                                                             "the trained VisEdit editor (its live version)."),
) -> None:
    """Make one MultEdit edit on a local model and write it as an edit-set file (or, with --server, on a
    running server, which registers it as a new adapter version).

    The edit is a rank-one change of one MLP's down projection (Basu et al.
    2024). The file holds the factors, the base-model fingerprint, the
    hyperparameters and a record of the request with P(answer) before and
    after and the time the key, value and update took.
    """
    if server is not None:
        if not image.is_file():
            fail(f"image not found: {image}")
        if layer != "auto" and not layer.lstrip("-").isdigit():
            fail(f"--layer must be a layer number or auto, not {layer!r}")
        for name, given in (("--out", out), ("--model", model), ("--onto", onto), ("--peft", peft)):
            if given is not None:
                fail(f"{name} applies to local edits; with --server the version goes to the server's registry")
        if editor not in ("multedit", "visedit"):
            fail(f"--editor must be multedit or visedit, not {editor!r}")
        if editor == "visedit" and not visedit_adapter:
            fail("--editor visedit needs --visedit-adapter: the adapter holding the trained VisEdit editor")
        options = {"editor": editor, "visedit_adapter": visedit_adapter}
        if editor == "multedit":
            options.update({"steps": steps, "lr": lr, "lam": lam, "max_norm": max_norm, "target_prob": target_prob,
                            "lr_scale": lr_scale})
        return service_cli.remote_edit(
            server, token, adapter, image, question, constraint, answer, layer, rephrase, image_rephrase, promote,
            options, as_json)
    if editor != "multedit" or visedit_adapter:
        fail("--editor and --visedit-adapter apply with --server; locally, use `editlens visedit edit`")
    if out is None:
        fail("--out is required (where to write the edit set), unless --server is given")
    from rich.console import Console

    from editors.edit_set import EditSet, EditSetError, describe
    from editors.multedit import EditRequest, MultEdit, MultEditConfig
    from editors.peft_export import export_peft
    from diagnostics.cases import world_phrases
    from vlm import VLMError

    console = Console(stderr=True)
    _optional_float(max_norm, "--max-norm")
    if out.suffix != ".safetensors":
        fail(f"--out must end in .safetensors, not {out.name!r}")
    if not image.is_file():
        fail(f"image not found: {image}")
    if layer != "auto" and not layer.lstrip("-").isdigit():
        fail(f"--layer must be a layer number or auto, not {layer!r}")
    if image_rephrase is not None and not image_rephrase.is_file():
        fail(f"image not found: {image_rephrase}")
    vlm = load_model(model, device, dtype)
    try:
        config = MultEditConfig(layer=layer if layer == "auto" else int(layer), lam=lam, steps=steps, lr=lr, lr_scale=lr_scale, max_norm=max_norm,
                                target_prob=target_prob)
        editor = MultEdit(vlm, config)
        base = EditSet.load(onto, vlm) if onto is not None else None
        if base is not None and base.editor != editor.name:
            fail(f"{onto} holds {base.editor} edits; --onto takes a MultEdit edit set")
        request = EditRequest(question, constraint, answer, image=image, rephrase=rephrase,
                              image_rephrase=image_rephrase, replacements=world_phrases(Path(vlm.path).parent))
        with progress_bar(console) as bar:
            task = bar.add_task("editing", total=None, info="")

            def progress(e) -> None:
                info = f"loss {e.loss:.3f}" if e.loss is not None else ""
                bar.update(task, description=e.stage, completed=e.step, total=e.steps or None, info=info)

            edit_set = editor.edit_sequentially([request], onto=base, progress=progress)
        size = edit_set.save(out)
        if peft is not None:
            export_peft(edit_set, peft, str(vlm.path))
    except (VLMError, EditSetError, ValueError) as exc:
        fail(str(exc))
    rec = edit_set.records[-1]
    result = {"out": str(out), "edit": rec, **describe(edit_set, size)}
    evidence = edit_set.hyperparameters.get("layer_evidence")
    if evidence is not None:
        result["layer_evidence"] = evidence
    if peft is not None:
        result["peft"] = str(peft)
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    m, sec = rec["metrics"], rec["seconds"]
    typer.echo(f"wrote {out} ({edit_set.num_edits} edit(s), {size} bytes)")
    typer.echo(f"  P({answer!r}): {m['p_before']:.4f} -> {m['p_after']:.4f}   layer {rec['layer']}, |delta| "
               f"{m['delta_norm']:.2f}, {m['value_steps']} value steps")
    if evidence is not None:
        typer.echo(f"  layer {evidence['layer']} chosen by the causal trace: MLP indirect effect per layer "
                   + " ".join(f"{v:.3f}" for v in evidence["scores"]))
    typer.echo(f"  time: key {1000 * sec['key']:.1f} ms, value {1000 * sec['value']:.1f} ms, "
               f"update {1000 * sec['update']:.2f} ms")
    if peft is not None:
        typer.echo(f"  PEFT LoRA adapter: {peft}")


@app.command("export-peft")
def export_peft_cmd(
    edit_set_file: Path = typer.Argument(..., help="An edit set (.safetensors) written by `editlens edit`."),
    out: Path = typer.Option(..., help="Adapter folder to write (adapter_model.safetensors + adapter_config.json)."),
    model: Optional[Path] = typer.Option(None, help="Check the edit set against this model folder first "
                                                   "(its fingerprint and shapes) and name it as the base."),
) -> None:
    """Export an edit set as a PEFT LoRA adapter (rank = number of edits per module, scaling 1)."""
    from editors.edit_set import EditSet, EditSetError
    from editors.peft_export import export_peft

    try:
        if model is not None:
            vlm = load_model(model, "cpu", "float32")
            edit_set = EditSet.load(edit_set_file, vlm)
        else:
            edit_set = EditSet.load(edit_set_file)
        export_peft(edit_set, out, str(model.resolve()) if model else None)
    except EditSetError as exc:
        fail(str(exc))
    typer.echo(f"wrote a PEFT LoRA adapter with {edit_set.num_edits} edit(s) to {out}")


def _fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


@bench_app.command("editing")
def bench_editing(
    editor: Optional[List[str]] = typer.Option(None, help="multedit, ft (FT-L) and/or visedit; default: all three "
                                                          "(visedit only when a trained adapter exists)."),
    adapter: Optional[Path] = typer.Option(None, help="VisEdit: the trained adapter (default: the one "
                                                      "`editlens visedit train` wrote for this world)."),
    cases: Optional[int] = typer.Option(None, help="How many test edit cases (default: all; a smaller number "
                                                   "keeps the file's mix of case types)."),
    sequential: int = typer.Option(50, help="Edits applied one after another for the sequential figure "
                                            "(0: skip)."),
    layer: int = typer.Option(0, help="The edited layer (both editors)."),
    panel: int = typer.Option(40, help="Unrelated held-out questions for specificity."),
    latency_edits: int = typer.Option(10, help="Edits timed one at a time (0: skip)."),
    lr_scale: str = typer.Option("residual", help="MultEdit's lr scale: residual (default) or none (the "
                                                  "paper's absolute lr 0.1)."),
    world: Optional[Path] = typer.Option(None, help="World folder (default: $EDITLENS_HOME/worlds/seed-N)."),
    seed: int = typer.Option(0, help="Which built world (ignored with --world)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print all figures as JSON on stdout."),
) -> None:
    """MultEdit, FT-L and VisEdit on the world's test edit cases: single, sequential, latency.

    E-VQA metrics (teacher-forced token accuracy): reliability, text and modal
    generality, text and modal locality (agreement with the pre-edit model);
    the paper's efficacy and generalisation (mean P(new answer)) and
    specificity (accuracy on unrelated questions before -> after).
    Counterfactual edits and long-tail insertions are reported separately.
    """
    from rich.console import Console

    from bench import editing
    from editors.metrics import CaseError

    from editors.edit_set import EditSetError
    from editors.visedit.train import default_adapter_path

    console = Console(stderr=True)
    folder, vlm = world_and_model(world, seed, device)
    adapter = adapter or default_adapter_path(folder)
    if editor is None:
        editor = ["multedit", "ft"] + (["visedit"] if adapter.is_file() else [])
        if not adapter.is_file():
            console.print(f"[bold]·[/bold] no trained VisEdit adapter at {adapter}: VisEdit left out "
                          "(run `editlens visedit train`)")
    elif "visedit" in editor and not adapter.is_file():
        fail(f"no trained VisEdit adapter at {adapter}; run `editlens visedit train` or pass --adapter")
    try:
        with progress_bar(console) as bar:
            task = bar.add_task("", total=None, info="", visible=False)

            def stage(msg: str) -> None:
                console.print(f"[bold]·[/bold] {msg}")

            def tick(i: int, n: int) -> None:
                bar.update(task, description="scoring", completed=i, total=n, visible=True)

            result = editing.run(vlm, folder, editors=editor, cases=cases, sequential=sequential, layer=layer,
                                 panel_size=panel, latency_edits=latency_edits, seed=seed, stage=stage, tick=tick,
                                 overrides={"multedit": {"lr_scale": lr_scale}, "visedit": {"adapter": adapter}})
    except (ValueError, CaseError, EditSetError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    _print_editing(result)


def _print_editing(result) -> None:
    from editors.metrics import EVQA, EXTRA, PAPER

    names = list(result["editors"])
    typer.echo(f"single edits at layer {result['layer']} (VisEdit: its adapter's layer), each from the base model "
               f"({result['cases']} cases)")
    cols = [(n, part) for n in names for part in result["editors"][n]["single"]]
    typer.echo(f"  {'':26s}" + "".join(f"{(n + ':' + p)[:17]:>18s}" for n, p in cols))
    typer.echo(f"  {'cases':26s}" + "".join(f"{result['editors'][n]['single'][p]['cases']:>18d}" for n, p in cols))
    for key in EVQA + ("evqa_mean",) + PAPER + EXTRA:
        typer.echo(f"  {key:26s}" + "".join(f"{_fmt(result['editors'][n]['single'][p].get(key)):>18s}"
                                            for n, p in cols))
    for n in names:
        seq = result["editors"][n].get("sequential")
        if seq:
            typer.echo(f"{n}: {seq['edits']} sequential edits, all scored at checkpoints ({seq['seconds']} s)")
            typer.echo(f"  {'edits':>6s}" + "".join(f"{k:>18s}" for k in EVQA + ("evqa_mean",)))
            for row in seq["curve"]:
                typer.echo(f"  {row['edits']:>6d}" + "".join(f"{_fmt(row[k]):>18s}" for k in EVQA + ("evqa_mean",)))
            if "file_bytes_per_edit" in seq:
                typer.echo(f"  edit-set file: {seq['file_bytes']} bytes, {seq['file_bytes_per_edit']} bytes per edit")
        lat = result["editors"][n].get("latency")
        if lat:
            split = (f" (key {lat['key_ms']} ms, value {lat['value_ms']} ms, update {lat['update_ms']} ms)"
                     if "key_ms" in lat else f" (signal {lat['signal_ms']} ms)" if "signal_ms" in lat else "")
            typer.echo(f"{n}: {lat['total_ms']} ms per edit, one at a time{split}")
    typer.echo(f"total {result['seconds']} s")


@bench_app.command("layers")
def bench_layers(
    cases: int = typer.Option(40, help="Test edit cases per layer."),
    layer: Optional[List[int]] = typer.Option(None, help="Layers to edit (default: all)."),
    lr_scale: str = typer.Option("residual", help="residual (default) or none (the paper's absolute lr 0.1)."),
    world: Optional[Path] = typer.Option(None, help="World folder (default: $EDITLENS_HOME/worlds/seed-N)."),
    seed: int = typer.Option(0, help="Which built world (ignored with --world)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """MultEdit efficacy per edited layer (the paper's Fig. 14 on this model)."""
    from rich.console import Console

    from bench import layers as layers_bench
    from editors.metrics import CaseError

    console = Console(stderr=True)
    folder, vlm = world_and_model(world, seed, device)
    try:
        result = layers_bench.run(vlm, folder, cases=cases, layers=layer, overrides={"lr_scale": lr_scale},
                                  stage=lambda m: console.print(f"[bold]·[/bold] {m}"))
    except (ValueError, CaseError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    fields = layers_bench.FIELDS
    typer.echo(f"MultEdit per layer, {result['cases']} single edits each ({result['seconds']} s)")
    typer.echo(f"  {'layer':>5s}" + "".join(f"{f[:16]:>17s}" for f in fields))
    for row in result["layers"]:
        bar = "#" * int(round(20 * row["efficacy"]))
        typer.echo(f"  {row['layer']:>5d}" + "".join(f"{_fmt(row[f]):>17s}" for f in fields) + f"  {bar}")
    typer.echo(f"best layer by efficacy: {result['best_layer']}")


@bench_app.command("visedit-layers")
def bench_visedit_layers(
    cases: int = typer.Option(40, help="Test edit cases per layer."),
    layer: Optional[List[int]] = typer.Option(None, help="VEAD layers (default: all)."),
    steps: int = typer.Option(500, help="Training steps of each layer's adapter."),
    world: Optional[Path] = typer.Option(None, help="World folder (default: $EDITLENS_HOME/worlds/seed-N)."),
    seed: int = typer.Option(0, help="Which built world (ignored with --world); also the training seed."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """VisEdit per VEAD layer: an adapter trained at each layer, E-VQA metrics of single edits (the
    paper's Table 2 on this model), beside the image read-out at that layer."""
    from rich.console import Console

    from bench import visedit_layers
    from editors.metrics import CaseError
    from editors.visedit.train import TrainError

    console = Console(stderr=True)
    folder, vlm = world_and_model(world, seed, device)
    try:
        result = visedit_layers.run(vlm, folder, layers=layer, cases=cases, steps=steps, seed=seed,
                                    stage=lambda m: console.print(f"[bold]·[/bold] {m}"))
    except (ValueError, CaseError, TrainError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    from editors.metrics import EVQA

    typer.echo(f"VisEdit per VEAD layer, {result['steps']} training steps each, {result['cases']} single edits "
               f"({result['seconds']} s)")
    typer.echo(f"  {'layer':>5s}" + "".join(f"{k[:16]:>17s}" for k in EVQA + ("evqa_mean", "image_readout")))
    for lyr, row in result["layers"].items():
        typer.echo(f"  {lyr:>5}" + "".join(f"{_fmt(row[k]):>17s}" for k in EVQA + ("evqa_mean", "image_readout")))


@bench_app.command("update")
def bench_update(
    d: int = typer.Option(4096, help="Output width of the edited projection (LLaVA-1.5-7B: 4096)."),
    d_ff: int = typer.Option(11008, help="Input width, the MLP width (LLaVA-1.5-7B: 11008)."),
    edits: int = typer.Option(1, help="Edits solved at once."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Time the rank-one closed form against the paper's explicit d_ff x d_ff inverse (random weights)."""
    from bench import update

    from vlm import ModelLoadError
    from vlm.loading import resolve_device

    try:
        result = update.run(d=d, d_ff=d_ff, edits=edits, device=str(resolve_device(device)))
    except (ValueError, ModelLoadError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(f"edited weight of a {d} x {d_ff} projection, {edits} edit(s), {result['device']}, "
               f"{result['torch_threads']} threads")
    typer.echo(f"  explicit inverse (paper):  {result['naive_seconds']:.3f} s, relative error of the update "
               f"{result['naive_relative_error']:.1e}")
    typer.echo(f"  rank-one closed form:      {result['rank_one_seconds']:.4f} s, relative error of the update "
               f"{result['rank_one_relative_error']:.1e}")
    typer.echo(f"  speedup {result['speedup']}x (errors against the exact solution in float64)")


@app.command("demo")
def demo(
    seed: int = typer.Option(0, help="World seed."),
    n: int = typer.Option(6, help="How many questions to answer."),
) -> None:
    """Build the embedded world (cached) and let its model answer a few test questions."""
    from vlm import encode, generate, load_vlm
    from vlm.world import build_world

    summary = build_world(seed=seed, stage=lambda m: typer.echo(f"· {m}", err=True))
    root = Path(summary["path"])
    vlm = load_vlm(root / "model")
    cases = json.loads((root / "edit_cases" / "test.json").read_text())
    shown = [c for c in cases if c["type"] == "counterfactual"][:n]
    prompts = [encode(vlm.processor, c["src"], image=root / c["image"]) for c in shown]
    answers = generate(vlm, prompts)
    typer.echo(f"world seed {seed} at {root}: train accuracy {summary['train_accuracy']:.3f}, "
               f"held-out paraphrases {summary['heldout_paraphrase_accuracy']:.3f}")
    for c, a in zip(shown, answers):
        mark = "ok " if a == c["ground_truth"] else "BAD"
        typer.echo(f"  [{mark}] {c['image']:28s} {c['src']:45s} -> {a}  (truth: {c['ground_truth']})")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())


@bench_app.command("diagnostics")
def bench_diagnostics(
    cases: int = typer.Option(5, help="Test cases timed per diagnostic."),
    diagnostic: Optional[List[str]] = typer.Option(None, help="trace, noise-trace, knockout, visual-attribution, "
                                                   "contributions, module-attribution (default: all)."),
    batch_size: int = typer.Option(256, help="Cells per forward pass of the batched engine."),
    ground_truth_cases: int = typer.Option(10, help="Insertion cases edited at each layer for the ground truth "
                                           "(0: skip)."),
    ground_truth_layer: Optional[List[int]] = typer.Option(None, help="Layers edited for the ground truth "
                                                           "(default: 0 1 2 3)."),
    world: Optional[Path] = typer.Option(None, help="World folder (default: $EDITLENS_HOME/worlds/seed-N)."),
    seed: int = typer.Option(0, help="Which built world (ignored with --world)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    figure: Optional[Path] = typer.Option(None, help="Write the ground truth's mean MLP effect per edited layer "
                                                     "as a PNG heatmap."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The batched diagnostics engine against the naive reference (times, ratio, largest difference), and
    the ground truth: facts inserted with MultEdit at layer k; does the trace's MLP effect peak at k?"""
    from rich.console import Console

    from bench import diagnostics as diag_bench
    from vlm import VLMError

    console = Console(stderr=True)
    folder, vlm = world_and_model(world, seed, device)
    try:
        result = diag_bench.run(vlm, folder, cases=cases, which=diagnostic, batch_size=batch_size,
                                ground_truth_cases=ground_truth_cases, ground_truth_layers=ground_truth_layer,
                                stage=lambda m: console.print(f"[bold]·[/bold] {m}"))
    except (ValueError, VLMError) as exc:
        fail(str(exc))
    if figure is not None and result.get("ground_truth"):
        result["ground_truth_figure"] = str(diag_bench.render_ground_truth(result["ground_truth"], figure))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(f"diagnostics engine, {result['device']} {result['dtype']}, batch {result['batch_size']}")
    typer.echo(f"  {'diagnostic':20s} {'cases':>5s} {'cells':>6s} {'naive s':>8s} {'uncached s':>10s} "
               f"{'batched s':>9s} {'speedup':>7s} {'max |diff|':>10s}")
    for name, r in result["speed"].items():
        s = r["seconds"]
        typer.echo(f"  {name:20s} {r['cases']:>5d} {r['cells']:>6d} {s['naive']:8.2f} {s['uncached']:10.2f} "
                   f"{s['batched']:9.2f} {r['speedup']:6.1f}x {r['max_abs_diff']:10.1e}")
    gt = result.get("ground_truth")
    if gt:
        typer.echo("ground truth: MultEdit insertion at layer k; share of cases whose MLP effect at the "
                   "constraint's last token peaks at k (edit trace / plain / isolated, both runs edited)")
        for k, v in gt["layers"].items():
            typer.echo(f"  layer {k}: {v['peak_at_k_edit']:.2f} / {v['peak_at_k_plain']:.2f} / "
                       f"{v['peak_at_k_isolated']:.2f}  over {v['cases']} cases "
                       f"(edits that took: {v['edits_that_took']:.2f})")
        typer.echo(f"  all: {gt['peak_at_k_edit']:.2f} / {gt['peak_at_k_plain']:.2f} / {gt['peak_at_k_isolated']:.2f}")
