"""``editlens visedit ...``: train a VEAD adapter, edit with it, and look at its influence mapper."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from editors.configs import VisEditTrainConfig

from .cli_support import console, fail, load_model, world_and_model
from .options import DEVICE, JSON, SEED, TOKEN, WORLD, config_options

visedit_app = typer.Typer(
    help="VisEdit (Chen et al.): a trained Visual Edit ADapter that edits through the visual representations.",
    no_args_is_help=True,
)


#: the trainer's settings offered as flags (from VisEditTrainConfig: default and help in one place)
TRAIN_FLAGS = (
    "layer",
    "signal_layer",
    "steps",
    "batch_size",
    "lr",
    "width",
    "heads",
    "mapper_tied",
    "synthetic",
    "synthetic_locality",
    "seed",
    "per_entity",
    "eval_every",
    "checkpoint_every",
    "im_tokens",
    "scope_far",
)


def _trained_adapter(adapter: Path | None, world: Path) -> Path:
    """The adapter file given, or the world's; a CLI message if there is none."""
    from vlm.world.folder import WorldFolder

    adapter = adapter or WorldFolder(world).visedit_adapter
    if not adapter.is_file():
        fail(f"no trained VisEdit adapter at {adapter}; run `editlens visedit train` or pass --adapter")
    return adapter


def _test_cases(world: Path) -> list[dict]:
    """The world's test edit cases, or the CLI's error."""
    from vlm.world.folder import WorldFolder, WorldFolderError

    try:
        return WorldFolder(world).edit_cases("test")
    except WorldFolderError as exc:
        fail(str(exc))


@visedit_app.command("train")
@config_options(VisEditTrainConfig, TRAIN_FLAGS, "settings", only_given=True)
def train_cmd(
    out: Path | None = typer.Option(
        None,
        help="Folder for checkpoints, the training log and the adapter (default: <world>/visedit). A run on a "
        "folder with a checkpoint resumes it.",
    ),
    world: Path | None = WORLD,
    world_seed: int = typer.Option(0, help="Which built world (ignored with --world)."),
    device: str = DEVICE,
    server: str | None = typer.Option(
        None,
        help="Train on this server (host:port) instead: a job whose result is registered as a version of --adapter.",
    ),
    token: str | None = TOKEN,
    adapter: str | None = typer.Option(
        None, help="With --server: the adapter to register the editor under (default: visedit)."
    ),
    as_json: bool = JSON,
    settings: dict | None = None,
) -> None:
    """Train a VEAD on the world's training split, the base model frozen (checkpoints, resume, best by
    validation loss). Writes <out>/adapter.safetensors: the adapter, ready to edit with."""
    from editors.configs import TrainError

    settings = dict(settings or {})
    try:
        VisEditTrainConfig(**settings).check()
    except TrainError as exc:
        fail(str(exc))
    if server is not None:
        from .service_cli import remote_train

        if out is not None or world is not None:
            fail("--out and --world apply to local training; the server trains on its own world")
        return remote_train(server, token, adapter, settings, True, as_json)
    _train_locally(out, world, world_seed, device, VisEditTrainConfig(**settings), as_json)


def _train_locally(out, world, world_seed, device, cfg, as_json) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from editors.configs import TrainError
    from editors.visedit.train import default_adapter_path, train_visedit

    con = console()
    folder, vlm = world_and_model(world, world_seed, device)
    out = out or default_adapter_path(folder).parent
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=con, transient=True) as bar:
        task = bar.add_task("training", total=cfg.steps, info="", visible=False)

        def progress(p) -> None:
            if p.stage == "train":
                info = f"loss {p.losses.get('loss', 0):.3f}" + (
                    f"  best val {p.validation_loss:.3f} @ {p.best_step}" if p.validation_loss is not None else ""
                )
                bar.update(task, completed=p.step, info=info, visible=True)
            elif p.stage == "validate":
                con.print(
                    f"[bold]·[/bold] step {p.step}: validation loss {p.validation_loss:.4f} "
                    f"(best at step {p.best_step})"
                )
            elif p.message and p.stage != "checkpoint":
                con.print(f"[bold]·[/bold] {p.message}")

        try:
            result = train_visedit(vlm, folder, out, cfg, progress)
        except (TrainError, ValueError) as exc:
            fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    a = result["adapter"]
    typer.echo(
        f"trained VEAD at layer {a['layer']} (signal at layer {a['signal_layer']}, width {a['width']}, "
        f"{result['parameter_count']} parameters) in {result['train_seconds']} s"
    )
    typer.echo(
        f"  best validation loss {result['best_validation_loss']:.4f} at step {result['best_step']} "
        f"of {result['steps']}"
    )
    typer.echo(f"  adapter: {result['adapter_path']}")
    if result.get("layer_evidence"):
        typer.echo(f"  layer: {result['layer_evidence']['criterion']}")


@visedit_app.command("calibrate")
def calibrate_cmd(
    adapter: Path | None = typer.Option(None, help="The trained adapter to gate (default: the world's); rewritten."),
    far: float = typer.Option(
        1e-3, help="Target false-accept rate of the scope gate on unrelated image pairs (sets the threshold)."
    ),
    off: bool = typer.Option(False, "--off", help="Remove the scope gate instead (the paper's ungated form)."),
    signal_rows: str | None = typer.Option(
        None,
        help="Also set what each later edit's signal keeps: all rows of the edit sample (the paper's), or text "
        "(not the image's rows: the adapter reads them little, and they are most of the bytes).",
    ),
    world: Path | None = WORLD,
    seed: int = SEED,
    device: str = DEVICE,
    as_json: bool = JSON,
) -> None:
    """Give a trained adapter its scope gate: reference keys from the images of the subjects the model
    knows, and a threshold calibrated to --far on renderings drawn for the purpose. Edits made with the
    adapter afterwards touch an image only when it is in their scope; others see the base model."""
    from editors.edit_set import EditSetError
    from editors.visedit import VisEditSet
    from editors.visedit.calibration import calibrate_world_scope

    if not off and not 0 < far < 1:
        fail(f"--far is a false-accept rate in (0, 1), not {far}")
    folder, vlm = world_and_model(world, seed, device)
    adapter = _trained_adapter(adapter, folder)
    try:
        trained = VisEditSet.load(adapter, vlm)
        if trained.num_edits:
            fail(f"{adapter} holds {trained.num_edits} edit(s); calibrate the trained adapter, then edit with it")
        if signal_rows is not None:
            trained = trained.with_signal_rows(signal_rows)
        scope = None if off else calibrate_world_scope(vlm, trained.vead, folder, far)
        trained.with_scope(scope).save(adapter)
    except (EditSetError, ValueError) as exc:
        fail(str(exc))
    result = {
        "adapter": str(adapter),
        "signal_rows": trained.config.signal_rows,
        "scope": None if scope is None else scope.to_manifest()["calibration"],
    }
    if scope is not None:
        result["threshold"] = scope.threshold
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    if scope is None:
        typer.echo(f"removed the scope gate of {adapter}")
        return
    cal = scope.calibration
    typer.echo(
        f"scope gate of {adapter}: threshold {scope.threshold:.4f} (false-accept {cal['false_accept']:.2g} on "
        f"{cal['negative_pairs']} unrelated pairs, target {far:g}); recall {cal['recall']:.3f} on "
        f"{cal['positive_pairs']} same-subject pairs; {cal['reference_images']} reference images"
    )
    for rate, lv in cal["levels"].items():
        typer.echo(f"  at false-accept {rate}: threshold {lv['threshold']:.4f}, recall {lv['recall']:.3f}")


@visedit_app.command("gate-map")
def gate_map_cmd(
    out: Path = typer.Option(..., help="PNG to write."),
    cases: int = typer.Option(30, help="Test cases, each edited alone."),
    adapter: Path | None = typer.Option(None, help="The trained adapter with its scope gate (default: the world's)."),
    world: Path | None = WORLD,
    seed: int = SEED,
    device: str = DEVICE,
    as_json: bool = JSON,
) -> None:
    """The scope gate after one edit per test case: how close each probe image's key is to the edit image's
    and whether the gate opens, for the edit image, another rendering, a held-out one, the unrelated image
    and a similar-looking entity (same shape and colours, another pattern)."""
    from editors.edit_set import EditSetError
    from editors.visedit.figures import gate_map

    if cases < 1:
        fail("--cases must be at least 1")
    folder, vlm = world_and_model(world, seed, device)
    adapter = _trained_adapter(adapter, folder)
    chosen = _test_cases(folder)[:cases]
    try:
        result = gate_map(vlm, adapter, folder, chosen, out)
    except (EditSetError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(f"wrote {out} (threshold {result['threshold']:.4f}, {result['cases']} cases)")
    for name, p in result["probes"].items():
        typer.echo(f"  {name}: mean cosine {p['mean_cos']:.3f}, the gate opens for {p['opens']:.0%}")


@visedit_app.command("edit")
def edit_cmd(
    image: Path = typer.Option(..., help="The edit image."),
    question: str = typer.Option(..., help="The question, e.g. 'which city is this landmark in ?'"),
    answer: str = typer.Option(..., help="The new answer."),
    out: Path = typer.Option(..., help="Where to write the VisEdit edit set (.safetensors)."),
    adapter: Path | None = typer.Option(
        None, help="The trained adapter (default: the embedded world's), or a VisEdit edit set whose edits are kept."
    ),
    onto: Path | None = typer.Option(None, help="An existing VisEdit edit set to add the edit to."),
    model: Path | None = typer.Option(None, help="Model folder (default: the embedded world model)."),
    device: str = DEVICE,
    as_json: bool = JSON,
) -> None:
    """Make one VisEdit edit (its signal: one forward pass) and write the edit set."""
    from editors.edit_set import EditSetError
    from editors.request import EditRequest
    from editors.visedit import VisEdit, VisEditSet
    from vlm import VLMError
    from vlm.world.folder import WorldFolder

    vlm = load_model(model, device, "auto")
    adapter = adapter or WorldFolder.default(0).visedit_adapter
    if not adapter.is_file():
        fail(f"no trained VisEdit adapter at {adapter}; run `editlens visedit train` or pass --adapter")
    if not image.is_file():
        fail(f"image not found: {image}")
    try:
        trained = VisEditSet.load(adapter, vlm)
        base = VisEditSet.load(onto, vlm) if onto is not None else None
        es = VisEdit(vlm, trained).edit([EditRequest(question, "", answer, image=image)], onto=base)
        size = es.save(out)
    except (EditSetError, VLMError, ValueError) as exc:
        fail(str(exc))
    rec = es.records[-1]
    result = {
        "out": str(out),
        "edits": es.num_edits,
        "file_bytes": size,
        "layer": rec["layer"],
        "signal_layer": rec["signal_layer"],
        **rec["metrics"],
    }
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(f"wrote {out}: {es.num_edits} edit(s), {size} bytes; VEAD at layer {rec['layer']}")
    typer.echo(f"  P({answer!r}) {rec['metrics']['p_before']:.4f} -> {rec['metrics']['p_after']:.4f}")


@visedit_app.command("influence-map")
def influence_map_cmd(
    out: Path = typer.Option(..., help="PNG to write."),
    case: str | None = typer.Option(None, help="A test edit case id (default: the first)."),
    adapter: Path | None = typer.Option(None, help="The trained adapter (default: the world's)."),
    world: Path | None = WORLD,
    seed: int = SEED,
    device: str = DEVICE,
    cases: int = typer.Option(
        0,
        help="Also summarise the mapper over the first N test cases (each edited "
        "alone): mean C per image kind and how often it separates them.",
    ),
    as_json: bool = JSON,
) -> None:
    """The influence mapper C over the edit image, another image of the subject and an unrelated image,
    after one edit (the paper's Fig. 3); with --cases N, the same summarised over N test cases."""
    from editors.edit_set import EditSetError
    from editors.visedit.figures import influence_maps, mapper_separation

    folder, vlm = world_and_model(world, seed, device)
    cases_all = _test_cases(folder)
    chosen = next((c for c in cases_all if c["case_id"] == case), None) if case else cases_all[0]
    if chosen is None:
        fail(f"no test case {case!r} among the test edit cases of {folder}")
    adapter = _trained_adapter(adapter, folder)
    if cases < 0:
        fail("--cases must be 0 or more")
    try:
        result = influence_maps(vlm, adapter, folder, chosen, out)
        if cases:
            result["summary"] = mapper_separation(vlm, adapter, folder, cases_all[:cases])
    except (EditSetError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(f"wrote {out}")
    for p in result["panels"]:
        typer.echo(f"  {p['title']}: mean C {p['mean']:.3f}, max {p['max']:.3f}")
    if cases:
        s = result["summary"]
        typer.echo(
            f"over {s['cases']} test case(s): mean C {s['mean_c_edit_image']:.3f} (edit image), "
            f"{s['mean_c_other_image_of_subject']:.3f} (another image of the subject), "
            f"{s['mean_c_unrelated_image']:.3f} (unrelated image); unrelated below the edit image in "
            f"{s['separated_edit_image']:.0%} of cases, below the other image in "
            f"{s['separated_other_image']:.0%}"
        )
