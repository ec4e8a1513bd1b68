"""The ``editlens`` command line: the composition root.

Every command imports the layers it needs inside its body (the model layer,
the editors, the server), so ``editlens --help`` and the remote commands,
which need only the SDK, stay fast. Sub-apps: ``world`` (here), ``bench``
(``bench_cli``), ``diagnose`` (``diagnose_cli``), ``visedit``
(``visedit_cli``); ``serve`` and the remote commands (``service_cli``).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from editors.configs import KeyGateConfig

from . import service_cli
from .bench_cli import bench_app
from .cli_support import console, fail, load_model, progress_bar, stage_printer, world_folder
from .diagnose_cli import diagnose_app
from .options import ADAPTER, DEVICE, DTYPE, JSON, MODEL, SEED, TOKEN, WORLD, config_options, parse_settings
from .registry_cli import registry_app
from .visedit_cli import visedit_app

app = typer.Typer(
    name="editlens",
    help="EditLens: edit and inspect LLaVA-family vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    tls_ca: Path | None = typer.Option(
        None,
        envvar="EDITLENS_TLS_CA",
        help="Reach the server over TLS, trusting the certificates this PEM CA signed (remote commands).",
    ),
    tls_cert: Path | None = typer.Option(
        None, envvar="EDITLENS_TLS_CERT", help="This client's PEM certificate, for a server that asks (mutual TLS)."
    ),
    tls_key: Path | None = typer.Option(None, envvar="EDITLENS_TLS_KEY", help="The private key of --tls-cert."),
    token_file: Path | None = typer.Option(
        None,
        envvar="EDITLENS_TOKEN_FILE",
        help="Read the bearer token from this file when a command gets no --token (a process list shows argv).",
    ),
) -> None:
    """EditLens: edit and inspect LLaVA-family vision-language models."""
    from registry import quiet_mlflow

    quiet_mlflow()  # this process's MLflow settings: no telemetry, no progress bars, fast failures
    service_cli.TRANSPORT.update(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token_file=token_file)


world_app = typer.Typer(
    help="The synthetic VQA world and its tiny LLaVA (the embedded default model).", no_args_is_help=True
)
app.add_typer(world_app, name="world")
app.add_typer(bench_app, name="bench")
app.add_typer(diagnose_app, name="diagnose")
app.add_typer(visedit_app, name="visedit")
app.add_typer(registry_app, name="registry")
service_cli.register(app)  # serve, generate, versions, promote, rollback, delete (the gRPC service)

#: the default editor's (KeyGate's) settings offered as flags of `editlens edit` (from KeyGateConfig: default and
#: help in one place); the settings they share with MultEdit and AlphaEdit go to those too, any other with --set
#: what ``editlens edit`` does with --rephrase and --image-rephrase
_VARIANT = "--layer auto averages over it too, and KeyGate keys the edit by it (unless --set variants=false)."
EDIT_FLAGS = ("layer", "steps", "lr", "lr_scale", "max_norm", "target_prob", "threshold")


@world_app.command("build")
def world_build(
    seed: int = typer.Option(0, help="World seed: the same seed gives the same world and model."),
    out: Path | None = typer.Option(
        None, help="Output folder (default: $EDITLENS_HOME/worlds/seed-N, EDITLENS_HOME defaults to ~/.cache/editlens)."
    ),
    force: bool = typer.Option(False, help="Rebuild even when a cached build with the same recipe exists."),
    steps: int | None = typer.Option(None, help="Training steps (default: the recipe's)."),
    family: str = typer.Option(
        "llava",
        help="The model family to train the world's model in: llava (the default model) or qwen2_vl "
        "(default folder: $EDITLENS_HOME/worlds/seed-N-qwen2_vl).",
    ),
    as_json: bool = JSON,
) -> None:
    """Generate the world, train its tiny model (LLaVA, or --family) and evaluate it (cached per seed and family)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from vlm.world import WORLD_FAMILIES, ModelConfig, TrainConfig, build_world

    con = console()
    train_cfg = TrainConfig(steps=steps) if steps else None
    if steps is not None and steps <= 0:
        fail("--steps must be positive")
    if family not in WORLD_FAMILIES:
        fail(f"--family must be one of {', '.join(WORLD_FAMILIES)}, not {family!r}")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=con,
        transient=True,
    ) as bar:
        task = bar.add_task("training", total=None, loss="-", visible=False)
        stage = stage_printer(con)

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=f"{loss:.3f}", visible=True)

        try:
            summary = build_world(
                seed=seed,
                out=out,
                force=force,
                model_cfg=ModelConfig(family=family),
                train_cfg=train_cfg,
                stage=stage,
                progress=progress,
            )
        except (FileExistsError, ValueError) as exc:
            fail(str(exc))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}, indent=1))
        return
    typer.echo(("cached world" if summary["cached"] else "built world") + f" at {summary['path']}")
    for key in (
        "train_accuracy",
        "heldout_paraphrase_accuracy",
        "heldout_image_accuracy",
        "text_fact_accuracy",
        "multi_constraint_accuracy",
        "image_swap_change_rate",
    ):
        typer.echo(f"  {key:30s} {summary[key]:.3f}")
    typer.echo(f"  {'build_seconds':30s} {summary['build_seconds']}")


@world_app.command("check")
def world_check(
    seed: int = SEED,
    world: Path | None = WORLD,
    questions: int = typer.Option(200, help="Held-out visual questions for the attention knockouts."),
    cases: int = typer.Option(50, help="Counterfactual test edit cases for the rank-one edits."),
    layer: list[int] | None = typer.Option(
        None, help="Layer(s) to edit (default: every early layer, the first half of the decoder)."
    ),
    device: str = DEVICE,
    as_json: bool = JSON,
) -> None:
    """Check that the model recalls visual facts through the constraint tokens.

    Prints constraint_knockout_drop (relative drop of P(answer) when the
    constraint tokens may not attend to the image in any layer; target >= 0.5),
    last_knockout_drop (the same for the positions that predict the answer),
    and constraint_edit_success (share of counterfactual cases a rank-one edit
    of an early MLP at the constraint's last token, value unbounded, makes
    top-1; target >= 0.9) with the layer, and identification / key_identification (over subjects the
    model never saw: how often another rendering's nearest edit image is its own subject's, in the image
    features and at the editor's key). Exit status 1 when a target is missed.
    """
    from editors.world_check import WorldCheckError, check_world
    from vlm import ModelLoadError, load_vlm

    con = console()
    folder = world_folder(world, seed)
    try:
        vlm = load_vlm(folder.model_dir, device=device)
        result = check_world(
            folder.root,
            vlm=vlm,
            questions=questions,
            cases=cases,
            layers=layer,
            stage=stage_printer(con),
        )
    except (WorldCheckError, ModelLoadError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        t = result["targets"]
        typer.echo(f"world check of {folder} ({result['questions']} questions, {result['cases']} edit cases)")
        typer.echo(
            f"  {'constraint_knockout_drop':26s} {result['constraint_knockout_drop']:.3f}"
            f"   target >= {t['constraint_knockout_drop']}"
        )
        typer.echo(f"  {'last_knockout_drop':26s} {result['last_knockout_drop']:.3f}   (LLaVA: small)")
        typer.echo(
            f"  {'constraint_edit_success':26s} {result['constraint_edit_success']:.3f}"
            f"   target >= {t['constraint_edit_success']}, layer {result['constraint_edit_layer']}"
        )
        typer.echo(
            f"  {'identification':26s} {result['identification']:.3f}   (another rendering's nearest edit image is "
            f"its own subject's, over {result['identification_subjects']} new subjects; chance "
            f"{result['identification_chance']:.4f})"
        )
        typer.echo(
            f"  {'key_identification':26s} {result['key_identification']:.3f}   (the same at the editor's key, layer "
            f"{result['key_layer']})"
        )
        for lyr, v in result["edit_by_layer"].items():
            typer.echo(
                f"    layer {lyr}: success {v['success']:.2f}, mean P(new) {v['mean_prob']:.3f}, "
                f"mean |delta| {v['mean_delta_norm']:.1f}"
            )
        typer.echo("passed" if result["passed"] else "FAILED: a target is missed")
    if not result["passed"]:
        raise typer.Exit(1)


@app.command("ask")
def ask_cmd(
    question: str = typer.Argument(..., help="The question, e.g. 'which city is this landmark in ?'"),
    image: Path | None = typer.Option(None, help="Image file (omit for a text-only question)."),
    model: Path | None = MODEL,
    answer: str | None = typer.Option(None, help="Also score this answer: teacher-forced log P and accuracy."),
    constraint: list[str] | None = typer.Option(None, help="Constraint text(s) to locate in the question."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    as_json: bool = JSON,
) -> None:
    """Answer one question with a local model (greedy), optionally scoring an answer."""
    from vlm import VLMError, encode, generate, score_answers

    vlm = load_model(model, device, dtype)
    try:
        prompt = encode(vlm.processor, question, image=image, constraints=constraint)
        result = {"question": question, "answer": generate(vlm, [prompt])[0]}
        toks = vlm.tokenizer.convert_ids_to_tokens(prompt.input_ids.tolist())
        result["constraints"] = [
            {"text": c, "tokens": toks[a:b], "span": [a, b]}
            for c, (a, b) in zip(constraint or [], prompt.constraint_spans)
        ]
        if prompt.image_spans:
            result["image_span"] = list(prompt.image_span)
            result["image_runs"] = [list(r) for r in prompt.image_spans]
        if answer is not None:
            scored = encode(vlm.processor, question, image=image, answer=answer)
            s = score_answers(vlm, [scored])[0]
            result["scored"] = {
                "answer": answer,
                "logprob": s.logprob,
                "prob": s.prob,
                "token_accuracy": s.token_accuracy,
            }
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
        typer.echo(
            f"  P({answer!r}) = {s['prob']:.4f} (log {s['logprob']:.3f}), token accuracy {s['token_accuracy']:.2f}"
        )


@app.command("edit")
@config_options(KeyGateConfig, EDIT_FLAGS, "flags", only_given=True)
def edit_cmd(
    image: Path = typer.Option(..., help="The edit image."),
    question: str = typer.Option(..., help="The question, e.g. 'which city is this landmark in ?'"),
    constraint: str = typer.Option(
        ...,
        help="The visual constraint as it occurs in the question ('this landmark'); the edit is made at its last "
        "token.",
    ),
    answer: str = typer.Option(..., help="The new answer."),
    rephrase: str | None = typer.Option(None, help=f"The question reworded: {_VARIANT}"),
    image_rephrase: Path | None = typer.Option(None, help=f"Another image of the subject: {_VARIANT}"),
    editor: str = typer.Option(
        "keygate",
        help="The editor (any registered one: keygate, alphaedit, multedit, visedit, ft, ...). The flags below "
        "from --layer on are KeyGate's settings (MultEdit and AlphaEdit share all but --threshold); any editor's "
        "settings go with --set, e.g. --set lam=0.1 for multedit.",
    ),
    setting: list[str] | None = typer.Option(
        None,
        "--set",
        help="A setting of the editor, NAME=VALUE (repeatable), e.g. --set max_change=0.01 for ft, "
        "--set adapter=A.safetensors for visedit.",
    ),
    out: Path | None = typer.Option(None, help="Where to write the edit set (.safetensors; required locally)."),
    model: Path | None = MODEL,
    onto: Path | None = typer.Option(
        None,
        help="An existing edit set of the same editor: the new edit is computed on the model with it applied, and "
        "--out holds both (sequential editing).",
    ),
    peft: Path | None = typer.Option(
        None, help="Also export the edit set as a PEFT LoRA adapter folder (MultEdit, AlphaEdit: weight deltas)."
    ),
    device: str = DEVICE,
    dtype: str = DTYPE,
    as_json: bool = JSON,
    server: str | None = typer.Option(
        None,
        help="Edit on this server (host:port) instead: the edit is a job there, registered as a new version of "
        "--adapter (live unless --no-promote); --out, --model, --onto, --peft do not apply.",
    ),
    token: str | None = TOKEN,
    adapter: str | None = ADAPTER,
    promote: bool = typer.Option(True, "--promote/--no-promote", help="With --server: make the new version live."),
    strict: bool = typer.Option(
        False,
        help="With --server: refuse the edit (nothing registered) when the new version misses the answer on "
        "--rephrase or --image-rephrase, not only on the question itself.",
    ),
    keep_unreached: bool = typer.Option(
        False,
        help="With --server: an edit that misses its own answer is registered but not made live (by default it "
        "is refused and nothing is registered).",
    ),
    visedit_adapter: str | None = typer.Option(
        None,
        help="With --server --editor visedit: the adapter that holds the trained VisEdit editor (its live version).",
    ),
    flags: dict | None = None,
) -> None:
    """Make one edit on a local model and write it as an edit-set file (or, with --server, on a running server,
    which registers it as a new adapter version).

    KeyGate (the default) writes MultEdit's value (Basu et al. 2024) into a
    key-gated memory at one MLP's down projection: it acts only where an input's
    key matches an edit's, so edits accumulate without breaking what the model
    knew. MultEdit (a rank-one weight change) and AlphaEdit (its null-space
    projected form) are the weight-delta editors. The file holds the edit, the
    base-model fingerprint, the hyperparameters and a record of the request with
    P(answer) before and after and the time each step took.
    """
    from editors import get_editor

    existing = [p for p in (image, image_rephrase) if p is not None and not p.is_file()]
    if existing:
        fail(f"image not found: {existing[0]}")
    try:
        spec = get_editor(editor)
    except ValueError as exc:
        fail(str(exc))
    options = {**(flags or {}), **parse_settings(spec.config_class, setting)}
    if server is not None:
        for name, given in (("--out", out), ("--model", model), ("--onto", onto), ("--peft", peft)):
            if given is not None:
                fail(f"{name} applies to local edits; with --server the version goes to the server's registry")
        layer = options.pop("layer", "auto")
        options.update(strict=strict, keep_unreached=keep_unreached)
        return service_cli.remote_edit(
            server,
            token,
            adapter,
            image,
            question,
            constraint,
            answer,
            editor,
            layer,
            rephrase,
            image_rephrase,
            promote,
            {**options, **({"editor_adapter": visedit_adapter} if visedit_adapter else {})},
            as_json,
        )
    if visedit_adapter:
        fail("--visedit-adapter names a server's adapter; locally, give the trained adapter file: --set adapter=FILE")
    if strict or keep_unreached:
        fail("--strict and --keep-unreached decide what a server registers; they need --server")
    if out is None:
        fail("--out is required (where to write the edit set), unless --server is given")
    if out.suffix != ".safetensors":
        fail(f"--out must end in .safetensors, not {out.name!r}")
    from editors.request import EditRequest

    request = EditRequest(question, constraint, answer, image=image, rephrase=rephrase, image_rephrase=image_rephrase)
    _local_edit(spec, options, request, out, model, onto, peft, (device, dtype), as_json)


def _local_edit(spec, options, request, out, model, onto, peft, device_dtype, as_json) -> None:
    from editors.files import EditSetError
    from vlm import VLMError
    from vlm.world.folder import WorldFolder

    vlm = load_model(model, *device_dtype)
    world = WorldFolder.of_model(vlm)  # the causal trace's replacements: only a world's own model has them
    request.replacements = world.phrases() if world is not None else []
    try:
        editor = spec.create(vlm, spec.config(vlm, **options))
        base = spec.load(onto, vlm) if onto is not None else None
        with progress_bar(console()) as bar:
            task = bar.add_task("editing", total=None, info="")

            def progress(e) -> None:
                info = f"loss {e.loss:.3f}" if e.loss is not None else ""
                bar.update(task, description=e.stage, completed=e.step, total=e.steps or None, info=info)

            edit_set = editor.edit_sequentially([request], onto=base, progress=progress)
        size = edit_set.save(out)
        if peft is not None:
            from editors.peft_export import export_peft

            export_peft(edit_set, peft, str(vlm.path))
    except (VLMError, EditSetError, ValueError) as exc:
        fail(str(exc))
    rec = edit_set.records[-1]
    result = {"out": str(out), "edit": rec, **edit_set.describe(size)}
    if editor.layer_evidence is not None:
        result["layer_evidence"] = editor.layer_evidence
    if peft is not None:
        result["peft"] = str(peft)
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    _print_edit(out, edit_set, size, rec, request.answer, editor.layer_evidence, peft)


def _print_edit(out, edit_set, size, rec, answer, evidence, peft) -> None:
    m, sec = rec["metrics"], rec.get("seconds", {})
    typer.echo(f"wrote {out} ({edit_set.num_edits} edit(s), {size} bytes)")
    extra = f", |delta| {m['delta_norm']:.2f}, {m['value_steps']} value steps" if "delta_norm" in m else ""
    typer.echo(f"  P({answer!r}): {m['p_before']:.4f} -> {m['p_after']:.4f}   layer {rec['layer']}{extra}")
    if evidence is not None:
        typer.echo(
            f"  layer {evidence['layer']} chosen: {evidence['criterion']}; scores "
            + " ".join(f"{v:.3f}" for v in evidence["scores"])
        )
    if sec:
        typer.echo("  time: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in sec.items()))
    if peft is not None:
        typer.echo(f"  PEFT LoRA adapter: {peft}")


@app.command("stats")
def stats_cmd(
    layer: list[int] = typer.Option([0], help="Decoder layer(s) whose down_proj inputs are summarised (repeatable)."),
    prompts: Path | None = typer.Option(
        None,
        help="A JSON list of {question, answer, image} (images relative to the file's grandparent, as a world's "
        "questions/*.json); default: the world's training questions when the model is a world's.",
    ),
    limit: int = typer.Option(5000, help="Questions sampled from the file (at most this many)."),
    force: bool = typer.Option(False, help="Compute again even if the statistics are stored."),
    model: Path | None = MODEL,
    device: str = DEVICE,
    dtype: str = DTYPE,
    as_json: bool = JSON,
) -> None:
    """Compute (once) and store the preservation statistics of a model's MLP keys: the mean key, C0 = E(k k^T)
    and the reference keys, per layer, beside the model (editlens-statistics/) so that every version and every
    replica uses the same. KeyGate and AlphaEdit read them; the first edit computes them if they are missing."""
    from editors.preservation import (
        PreservationStats,
        StatisticsError,
        compute_statistics,
        default_prompt_file,
        prompts_from_file,
        statistics_path,
    )

    vlm = load_model(model, device, dtype)
    source = prompts or default_prompt_file(vlm)
    if limit < 1:
        fail("--limit must be at least 1")
    rows = []
    try:
        for ly in layer:
            if not 0 <= ly < vlm.num_layers:
                fail(f"layer {ly} is outside 0..{vlm.num_layers - 1}")
            path = statistics_path(vlm, ly)
            if path.is_file() and not force:
                stats, computed = PreservationStats.load(path, vlm), False
            else:
                if source is None:
                    fail("this model is not a world's: give --prompts FILE (a JSON list of {question, answer, image})")
                encoded, info, subjects = prompts_from_file(vlm, source, limit)
                stats, computed = compute_statistics(vlm, encoded, ly, info, subjects), True
                stats.save(path)
            d_ff = int(stats.mean.shape[0])
            rows.append(
                {
                    "layer": ly,
                    "path": str(path),
                    "computed_now": computed,
                    "seconds": stats.seconds,
                    "tokens": stats.count,
                    "reference_keys": int(stats.reference.shape[0]),
                    "file_bytes": path.stat().st_size,
                    "d_ff": d_ff,
                    "null_space_dim": int(stats.null_space().shape[1]),
                    "digest": stats.digest,
                    "c0_bytes_at_d_ff_11008": 4 * 11008 * 11008,
                }
            )
    except StatisticsError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        typer.echo(
            f"layer {r['layer']}: {r['tokens']} tokens, {r['reference_keys']} reference keys, "
            f"C0 {r['d_ff']}x{r['d_ff']} ({r['file_bytes'] / 2**20:.1f} MiB, {r['seconds']:.1f} s), "
            f"null space {r['null_space_dim']} dims, "
            f"digest {r['digest']} -> {r['path']}"
        )


@app.command("export-peft")
def export_peft_cmd(
    edit_set_file: Path = typer.Argument(..., help="An edit set (.safetensors) written by `editlens edit`."),
    out: Path = typer.Option(..., help="Adapter folder to write (adapter_model.safetensors + adapter_config.json)."),
    model: Path | None = typer.Option(
        None,
        help="Check the edit set against this model folder first (its fingerprint and shapes) and name it as the base.",
    ),
) -> None:
    """Export an edit set as a PEFT LoRA adapter (rank = number of edits per module, scaling 1)."""
    from editors.edit_set import FORMAT, EditSet
    from editors.files import EditSetError, read_manifest_format
    from editors.peft_export import export_peft, not_exportable

    try:
        fmt, editor = read_manifest_format(edit_set_file)
        if fmt != FORMAT:
            fail(not_exportable(editor) or f"cannot export to PEFT: {edit_set_file} is not a low-rank edit set")
        if model is not None:
            vlm = load_model(model, "cpu", "float32")
            edit_set = EditSet.load(edit_set_file, vlm)
        else:
            edit_set = EditSet.load(edit_set_file)
        export_peft(edit_set, out, str(model.resolve()) if model else None)
    except EditSetError as exc:
        fail(str(exc))
    typer.echo(f"wrote a PEFT LoRA adapter with {edit_set.num_edits} edit(s) to {out}")


@app.command("demo")
def demo(
    seed: int = typer.Option(0, help="World seed."),
    n: int = typer.Option(6, help="How many questions to answer."),
) -> None:
    """Build the embedded world (cached) and let its model answer a few test questions."""
    from vlm import encode, generate, load_vlm
    from vlm.world import WorldFolder, build_world

    summary = build_world(seed=seed, stage=lambda m: typer.echo(f"· {m}", err=True))
    root = WorldFolder(summary["path"])
    vlm = load_vlm(root.model_dir)
    cases = root.edit_cases("test")
    shown = [c for c in cases if c["type"] == "counterfactual"][:n]
    prompts = [encode(vlm.processor, c["src"], image=root.image(c["image"])) for c in shown]
    answers = generate(vlm, prompts)
    typer.echo(
        f"world seed {seed} at {root}: train accuracy {summary['train_accuracy']:.3f}, "
        f"held-out paraphrases {summary['heldout_paraphrase_accuracy']:.3f}"
    )
    for c, a in zip(shown, answers):
        mark = "ok " if a == c["ground_truth"] else "BAD"
        typer.echo(f"  [{mark}] {c['image']:28s} {c['src']:45s} -> {a}  (truth: {c['ground_truth']})")


if __name__ == "__main__":  # python -m client.cli ...
    app()
