"""``editlens bench ...``: the benchmarks, each printing its figures next to a reference from the same run.

The work lives in ``bench/``; these commands parse the options, show progress and print the tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .cli_support import console as stderr_console
from .cli_support import fail, progress_bar, stage_printer, world_and_model
from .options import DEVICE, JSON, SEED, WORLD, parse_settings

bench_app = typer.Typer(
    help="Benchmarks: figures next to a baseline or naive reference from the same run.", no_args_is_help=True
)


def _fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


@bench_app.command("editing")
def bench_editing(
    editor: list[str] | None = typer.Option(
        None,
        help="Editors to compare (any registered: multedit, visedit, ft, ...); default: every editor that can be "
        "set up for the world (visedit once `editlens visedit train` has made its adapter).",
    ),
    setting: list[str] | None = typer.Option(
        None,
        "--set",
        help="An editor's setting, EDITOR.NAME=VALUE (repeatable), e.g. multedit.lr_scale=none or "
        "visedit.adapter=A.safetensors.",
    ),
    cases: int | None = typer.Option(
        None, help="How many test edit cases (default: all; a smaller number keeps the file's mix of case types)."
    ),
    sequential: int = typer.Option(50, help="Edits applied one after another for the sequential figure (0: skip)."),
    layer: int = typer.Option(0, help="The edited layer (editors whose config has a layer)."),
    panel: int = typer.Option(40, help="Unrelated held-out questions for specificity."),
    latency_edits: int = typer.Option(10, help="Edits timed one at a time (0: skip)."),
    world: Path | None = WORLD,
    seed: int = SEED,
    device: str = DEVICE,
    as_json: bool = JSON,
) -> None:
    """Editors on the world's test edit cases: single, sequential, latency.

    E-VQA metrics (teacher-forced token accuracy): reliability, text and modal
    generality, text and modal locality (agreement with the pre-edit model);
    the paper's efficacy and generalisation (mean P(new answer)) and
    specificity (accuracy on unrelated questions before -> after).
    Counterfactual edits and long-tail insertions are reported separately.
    """
    from bench import editing
    from editors import DEFAULT_EDITOR
    from editors.files import EditSetError
    from editors.metrics import CaseError

    parsed = _parse_overrides(setting)
    console = stderr_console()
    folder, vlm = world_and_model(world, seed, device)
    try:
        with progress_bar(console) as bar:
            task = bar.add_task("", total=None, info="", visible=False)

            def tick(i: int, n: int) -> None:
                bar.update(task, description="scoring", completed=i, total=n, visible=True)

            result = editing.run(
                vlm,
                folder,
                editors=editor,
                cases=cases,
                sequential=sequential,
                layer=layer,
                panel_size=panel,
                latency_edits=latency_edits,
                seed=seed,
                stage=stage_printer(console),
                tick=tick,
                overrides=parsed,
            )
    except (ValueError, CaseError, EditSetError) as exc:
        fail(str(exc))
    result["default_editor"] = DEFAULT_EDITOR
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    _print_editing(result)


def _parse_overrides(setting: list[str] | None) -> dict:
    """``--set EDITOR.NAME=VALUE`` items as each editor's parsed settings (a CLI message for bad ones)."""
    from editors import get_editor

    overrides: dict[str, list[str]] = {}
    for item in setting or ():
        name, dot, rest = item.partition(".")
        if not dot:
            fail(f"--set takes EDITOR.NAME=VALUE, not {item!r}")
        overrides.setdefault(name, []).append(rest)
    try:
        return {name: parse_settings(get_editor(name).config_class, items) for name, items in overrides.items()}
    except ValueError as exc:
        fail(str(exc))


@bench_app.command("lifelong")
def bench_lifelong(
    editor: list[str] | None = typer.Option(
        None,
        help="Editors to compare (any registered, repeatable, e.g. --editor keygate --editor alphaedit --editor "
        "multedit --editor ft); default: the default editor alone (keygate).",
    ),
    setting: list[str] | None = typer.Option(
        None, "--set", help="An editor's setting, EDITOR.NAME=VALUE (repeatable), e.g. keygate.threshold=0.9."
    ),
    edits: int = typer.Option(1000, help="Edits from the world's edit stream, one after another."),
    single: int = typer.Option(100, help="Single edits (each alone, from the base model) for the reference row."),
    layer: int = typer.Option(0, help="The edited layer."),
    panel: int = typer.Option(200, help="Held-out questions about known entities for specificity."),
    figure: Path | None = typer.Option(None, help="Also draw the curves into this PNG."),
    serve: int = typer.Option(
        0,
        help="Also register each editor's final edits as one version of a real server and time N Generate calls "
        "with them against the base model (in and out of scope).",
    ),
    world: Path | None = WORLD,
    seed: int = SEED,
    device: str = DEVICE,
    as_json: bool = JSON,
) -> None:
    """Lifelong editing: the world's edit stream edited one fact after another (each on the model with every
    earlier edit, as a lineage grows), every edit so far scored after 10, 50, 100, 200, 500 and 1000 edits.

    Per mark: the five E-VQA metrics, modal generality on a held-out rendering, efficacy, specificity on
    known entities no edit touched (before -> after), ms per edit, bytes per edit and the update's norm;
    the single-edit figures beside; the key geometry of the stream at the layer; for a gated editor
    (VisEdit with a scope gate) the gate's recall, precision and false accepts.
    """
    from bench import lifelong
    from editors import DEFAULT_EDITOR
    from editors.files import EditSetError

    parsed = _parse_overrides(setting)
    names = list(dict.fromkeys(editor or [DEFAULT_EDITOR]))
    console = stderr_console()
    folder, vlm = world_and_model(world, seed, device)
    try:
        with progress_bar(console) as bar:
            task = bar.add_task("", total=None, info="", visible=False)

            def tick(i: int, n: int) -> None:
                bar.update(task, description="editing", completed=i, total=n, visible=True)

            result = lifelong.run(
                vlm,
                folder,
                names,
                edits=edits,
                layer=layer,
                single=single,
                panel_size=panel,
                overrides=parsed,
                stage=stage_printer(console),
                tick=tick,
                serve_requests=serve,
            )
    except (ValueError, EditSetError) as exc:
        fail(str(exc))
    result["default_editor"] = DEFAULT_EDITOR
    if figure is not None:
        result["figure"] = str(lifelong.figure(result, figure))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    _print_lifelong(result)


def _print_lifelong(result) -> None:
    keys = (
        "reliability",
        "text_generality",
        "modal_generality",
        "text_locality",
        "modal_locality",
        "modal_locality_unedited",
        "modal_locality_near",
        "modal_locality_near_cases",
        "modal_generality_heldout",
        "specificity_before",
        "specificity_after",
        "edit_ms",
        "bytes_per_edit",
    )
    g = result["key_geometry"]
    typer.echo(
        f"{result['edits']} edits from the stream {result['stream_types']} at layer {result['layer']}; key geometry: "
        f"another rendering's key nearest its own subject's in {g['other_rendering_nearest_is_own']:.0%} of cases"
    )
    near = result.get("near_neighbours")
    if near:
        typer.echo(_near_line(near, result["edits"], "edits"))
    labels = {"modal_locality_near": "mloc_near", "modal_locality_near_cases": "near_cases"}
    labels["modal_generality_heldout"] = "mgen_heldout"
    for name, entry in result["editors"].items():
        typer.echo(f"{name}")
        typer.echo(f"  {'edits':>6s}" + "".join(f"{labels.get(k, k[:12]):>13s}" for k in keys))
        rows = ([("single", entry["single"])] if entry.get("single") else []) + [
            (str(p["edits"]), p) for p in entry["curve"]
        ]
        for label, row in rows:
            typer.echo(f"  {label:>6s}" + "".join(f"{_num(row.get(k)):>13s}" for k in keys))
        gates = [(p["edits"], p["gate"]) for p in entry["curve"] if p.get("gate")]
        for edits, g in gates:
            typer.echo(
                f"  scope gate after {edits}: recall {_num(g['recall'])}, precision {_num(g['precision'])}, "
                f"false accepts {_num(g.get('false_accept_reference'))} (reference images) / "
                f"{_num(g.get('false_accept_outside'))} (other known renderings) / "
                f"{_num(g.get('false_accept_stream'))} (unedited stream subjects)"
            )
        if entry.get("served"):
            sv = entry["served"]
            typer.echo(
                f"  served as version {sv['version']}: Generate median ratio {sv['ratio_median_in_scope']} in scope, "
                f"{sv['ratio_median_out_of_scope']} out of scope (edits live / base model)"
            )
    if result.get("figure"):
        typer.echo(f"figure: {result['figure']}")


def _near_line(near: dict, total: int, what: str) -> str:
    """How many cases have a near neighbour (bench editing's and bench lifelong's ``near_neighbours``)."""
    by = ", ".join(f"{n} {a}" for a, n in near["attribute"].items() if n)
    src = ", ".join(f"{n} {s}" for s, n in near["source"].items() if n)
    return (
        f"near neighbours (a look one attribute away): {near['cases']} of {total} {what} have one "
        f"(differing in {by or 'nothing'}; from {src or 'nowhere'}), {near['without']} left out of modal_locality_near"
    )


def _num(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else f"{v:.0f}" if isinstance(v, (int, float)) else str(v)


def _print_editing(result) -> None:
    from editors.metrics import EVQA, EXTRA, EXTRA_CASES, PAPER

    names = list(result["editors"])
    typer.echo(
        f"single edits at layer {result['layer']} (VisEdit: its adapter's layer), each from the base model "
        f"({result['cases']} cases)"
    )
    cols = [(n, part) for n in names for part in result["editors"][n]["single"]]
    typer.echo(f"  {'':26s}" + "".join(f"{(n + ':' + p)[:17]:>18s}" for n, p in cols))
    typer.echo(f"  {'cases':26s}" + "".join(f"{result['editors'][n]['single'][p]['cases']:>18d}" for n, p in cols))
    for key in EVQA + ("evqa_mean",) + PAPER + EXTRA:
        typer.echo(
            f"  {key:26s}" + "".join(f"{_fmt(result['editors'][n]['single'][p].get(key)):>18s}" for n, p in cols)
        )
    for key, label in zip(EXTRA_CASES.values(), ("cases, held-out image", "cases, near neighbour")):
        counts = [result["editors"][n]["single"][p].get(key) for n, p in cols]
        typer.echo(f"  {label:26s}" + "".join(f"{'-' if c is None else c:>18}" for c in counts))
    if result.get("near_neighbours"):
        typer.echo(_near_line(result["near_neighbours"], result["cases"], "cases"))
    for n in names:
        by = result["editors"][n].get("single_near_by_attribute")
        if by:
            parts = [f"{a} {v['modal_locality_near']:.3f} ({v['cases']})" for a, v in by.items()]
            typer.echo(f"  {n}: modal_locality_near by the attribute that differs: {', '.join(parts)}")
    for n in names:
        seq = result["editors"][n].get("sequential")
        if seq:
            typer.echo(f"{n}: {seq['edits']} sequential edits, all scored at checkpoints ({seq['seconds']} s)")
            typer.echo(f"  {'edits':>6s}" + "".join(f"{k[:17]:>18s}" for k in EVQA + ("evqa_mean",) + EXTRA))
            for row in seq["curve"]:
                typer.echo(
                    f"  {row['edits']:>6d}" + "".join(f"{_fmt(row.get(k)):>18s}" for k in EVQA + ("evqa_mean",) + EXTRA)
                )
            if "file_bytes_per_edit" in seq:
                typer.echo(f"  edit-set file: {seq['file_bytes']} bytes, {seq['file_bytes_per_edit']} bytes per edit")
        lat = result["editors"][n].get("latency")
        if lat:
            parts = [f"{k.removesuffix('_ms')} {v} ms" for k, v in lat.items() if k.endswith("_ms") and k != "total_ms"]
            split = f" ({', '.join(parts)})" if parts else ""
            typer.echo(f"{n}: {lat['total_ms']} ms per edit, one at a time{split}")
    typer.echo(f"total {result['seconds']} s")


@bench_app.command("layers")
def bench_layers(
    cases: int = typer.Option(40, help="Test edit cases per layer."),
    layer: list[int] | None = typer.Option(None, help="Layers to edit (default: all)."),
    lr_scale: str = typer.Option("residual", help="residual (default) or none (the paper's absolute lr 0.1)."),
    world: Path | None = WORLD,
    seed: int = SEED,
    device: str = DEVICE,
    as_json: bool = JSON,
) -> None:
    """MultEdit efficacy per edited layer (the paper's Fig. 14 on this model)."""
    from bench import layers as layers_bench
    from editors.metrics import CaseError

    console = stderr_console()
    folder, vlm = world_and_model(world, seed, device)
    try:
        result = layers_bench.run(
            vlm,
            folder,
            cases=cases,
            layers=layer,
            overrides={"lr_scale": lr_scale},
            stage=stage_printer(console),
        )
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
    layer: list[int] | None = typer.Option(None, help="VEAD layers (default: all)."),
    steps: int = typer.Option(500, help="Training steps of each layer's adapter."),
    world: Path | None = WORLD,
    seed: int = typer.Option(0, help="Which built world (ignored with --world); also the training seed."),
    device: str = DEVICE,
    as_json: bool = JSON,
) -> None:
    """VisEdit per VEAD layer: an adapter trained at each layer, E-VQA metrics of single edits (the
    paper's Table 2 on this model), beside the image read-out at that layer."""
    from bench import visedit_layers
    from editors.metrics import CaseError
    from editors.visedit.train import TrainError

    console = stderr_console()
    folder, vlm = world_and_model(world, seed, device)
    try:
        result = visedit_layers.run(
            vlm,
            folder,
            layers=layer,
            cases=cases,
            steps=steps,
            seed=seed,
            stage=stage_printer(console),
        )
    except (ValueError, CaseError, TrainError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    from editors.metrics import EVQA

    typer.echo(
        f"VisEdit per VEAD layer, {result['steps']} training steps each, {result['cases']} single edits "
        f"({result['seconds']} s)"
    )
    typer.echo(f"  {'layer':>5s}" + "".join(f"{k[:16]:>17s}" for k in EVQA + ("evqa_mean", "image_readout")))
    for lyr, row in result["layers"].items():
        typer.echo(f"  {lyr:>5}" + "".join(f"{_fmt(row[k]):>17s}" for k in EVQA + ("evqa_mean", "image_readout")))


@bench_app.command("update")
def bench_update(
    d: int = typer.Option(4096, help="Output width of the edited projection (LLaVA-1.5-7B: 4096)."),
    d_ff: int = typer.Option(11008, help="Input width, the MLP width (LLaVA-1.5-7B: 11008)."),
    edits: int = typer.Option(1, help="Edits solved at once."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    as_json: bool = JSON,
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
    typer.echo(
        f"edited weight of a {d} x {d_ff} projection, {edits} edit(s), {result['device']}, "
        f"{result['torch_threads']} threads"
    )
    typer.echo(
        f"  explicit inverse (paper):  {result['naive_seconds']:.3f} s, relative error of the update "
        f"{result['naive_relative_error']:.1e}"
    )
    typer.echo(
        f"  rank-one closed form:      {result['rank_one_seconds']:.4f} s, relative error of the update "
        f"{result['rank_one_relative_error']:.1e}"
    )
    typer.echo(f"  speedup {result['speedup']}x (errors against the exact solution in float64)")


@bench_app.command("diagnostics")
def bench_diagnostics(
    cases: int = typer.Option(5, help="Test cases timed per diagnostic."),
    diagnostic: list[str] | None = typer.Option(
        None, help="trace, noise-trace, knockout, visual-attribution, contributions, module-attribution (default: all)."
    ),
    batch_size: int = typer.Option(256, help="Cells per forward pass of the batched engine."),
    ground_truth_cases: int = typer.Option(
        10, help="Insertion cases edited at each layer for the ground truth (0: skip)."
    ),
    ground_truth_layer: list[int] | None = typer.Option(
        None, help="Layers edited for the ground truth (default: 0 1 2 3)."
    ),
    world: Path | None = WORLD,
    seed: int = SEED,
    device: str = DEVICE,
    figure: Path | None = typer.Option(
        None, help="Write the ground truth's mean MLP effect per edited layer as a PNG heatmap."
    ),
    shape: str | None = typer.Option(
        None,
        help="llava-1.5: time the engines on a LLaVA-1.5-shaped random-weight model instead (576 image tokens, "
        "narrow and shallow; built once under $EDITLENS_HOME/shapes from the world's tokenizer); no ground truth.",
    ),
    as_json: bool = JSON,
) -> None:
    """The batched diagnostics engine against the naive reference (times, ratio, largest difference), and
    the ground truth: facts inserted with MultEdit at layer k; does the trace's MLP effect peak at k?"""
    from bench import diagnostics as diag_bench
    from vlm import VLMError

    console = stderr_console()
    folder, vlm = world_and_model(world, seed, device)
    if shape is not None:
        from vlm import load_vlm
        from vlm.home import shapes_dir
        from vlm.world.shapes import llava15_shaped

        if shape != "llava-1.5":
            fail(f"unknown --shape {shape!r}; the one shape is llava-1.5")
        stage_printer(console)("building the LLaVA-1.5-shaped random-weight model (once)")
        shaped = llava15_shaped(vlm.path, shapes_dir() / f"llava-1.5-{vlm.fingerprint[:12]}")
        vlm = load_vlm(shaped, device=device)
        ground_truth_cases = 0  # random weights know no facts
    try:
        result = diag_bench.run(
            vlm,
            folder,
            cases=cases,
            which=diagnostic,
            batch_size=batch_size,
            ground_truth_cases=ground_truth_cases,
            ground_truth_layers=ground_truth_layer,
            stage=stage_printer(console),
        )
    except (ValueError, VLMError) as exc:
        fail(str(exc))
    if figure is not None and result.get("ground_truth"):
        result["ground_truth_figure"] = str(diag_bench.render_ground_truth(result["ground_truth"], figure))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(f"diagnostics engine, {result['device']} {result['dtype']}, batch {result['batch_size']}")
    typer.echo(
        f"  {'diagnostic':20s} {'cases':>5s} {'cells':>6s} {'naive s':>8s} {'uncached s':>10s} "
        f"{'batched s':>9s} {'speedup':>7s} {'max |diff|':>10s}"
    )
    for name, r in result["speed"].items():
        s = r["seconds"]
        typer.echo(
            f"  {name:20s} {r['cases']:>5d} {r['cells']:>6d} {s['naive']:8.2f} {s['uncached']:10.2f} "
            f"{s['batched']:9.2f} {r['speedup']:6.1f}x {r['max_abs_diff']:10.1e}"
        )
    gt = result.get("ground_truth")
    if gt:
        typer.echo(
            "ground truth: MultEdit insertion at layer k; share of cases whose MLP effect at the "
            "constraint's last token peaks at k (edit trace / plain / isolated, both runs edited)"
        )
        for k, v in gt["layers"].items():
            typer.echo(
                f"  layer {k}: {v['peak_at_k_edit']:.2f} / {v['peak_at_k_plain']:.2f} / "
                f"{v['peak_at_k_isolated']:.2f}  over {v['cases']} cases "
                f"(edits that took: {v['edits_that_took']:.2f})"
            )
        typer.echo(f"  all: {gt['peak_at_k_edit']:.2f} / {gt['peak_at_k_plain']:.2f} / {gt['peak_at_k_isolated']:.2f}")


@bench_app.command("gate")
def bench_gate(
    edits: list[int] | None = typer.Option(
        None, help="Numbers of live edit keys (repeatable); default 1, 100, 1000, 10000."
    ),
    layer: int = typer.Option(0, help="The gate's layer."),
    rounds: int = typer.Option(20, help="Round-robin rounds (the first warms up)."),
    world: Path | None = WORLD,
    seed: int = SEED,
    device: str = DEVICE,
    as_json: bool = JSON,
) -> None:
    """What KeyGate's gate costs Generate by the number of live edit keys: base model, the joint scan of edit
    and reference keys (the gate's definition) and the edit keys first (what serves), timed round-robin."""
    from bench import gate

    console = stderr_console()
    folder, vlm = world_and_model(world, seed, device)
    try:
        r = gate.run(
            vlm, folder, edits or (1, 100, 1000, 10000), layer=layer, rounds=rounds, stage=stage_printer(console)
        )
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(r, indent=1))
        return
    typer.echo(f"KeyGate's gate at layer {r['layer']}, {r['reference_keys']} reference keys; Generate, median ms")
    for row in r["rows"]:
        typer.echo(
            f"  {row['edit_keys']:>6d} edit keys: base {row['base_ms']:.1f}, joint scan {row['joint_ms']:.1f} "
            f"({row['joint_ratio']:.2f}x), edits first {row['edits_first_ms']:.1f} ({row['edits_first_ratio']:.2f}x)"
        )


@bench_app.command("lineage")
def bench_lineage_cmd(
    edits: int = typer.Option(1000, help="Edit calls, one version each, on one adapter."),
    editor: str = typer.Option("keygate", help="The editor of the Edit calls."),
    layer: int = typer.Option(0, help="The edited layer."),
    requests: int = typer.Option(30, help="Generate requests timed per row."),
    world: Path | None = WORLD,
    seed: int = SEED,
    device: str = DEVICE,
    as_json: bool = JSON,
) -> None:
    """A lineage built by the Edit RPC one version at a time (a real gRPC server and MLflow registry): Edit latency
    at 1, 100, 1000 live edits (and one probe edit on the base model and on the last version), Generate latency with
    every edit live against the base model, and a rollback from the last version to the middle one."""
    from bench import lineage

    console = stderr_console()
    folder, vlm = world_and_model(world, seed, device)
    try:
        with progress_bar(console) as bar:
            task = bar.add_task("", total=None, info="", visible=False)

            def tick(i: int, n: int) -> None:
                bar.update(task, description="Edit calls", completed=i, total=n, visible=True)

            r = lineage.run(
                vlm,
                folder,
                edits=edits,
                editor=editor,
                layer=layer,
                requests=requests,
                stage=stage_printer(console),
                tick=tick,
            )
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(r, indent=1))
        return
    typer.echo(f"{r['edits']} {r['editor']} edits, one Edit call (one version) each")
    for row in r["edit_ms"]:
        typer.echo(
            f"  Edit call with {row['live_edits']:>5d} live edits: {row['mean_ms']:8.1f} ms; registry "
            f"{row['registry_bytes'] / 1e6:8.2f} MB ({row['registry_bytes_per_edit']} bytes per edit)"
        )
    p = r["probe_edit_ms"]
    typer.echo(f"  the same edit on the base model / on the last version: {p} ")
    g = r["generate"]
    typer.echo(f"  Generate median: base {g['base model']['median_ms']} ms, all edits live ratio {g['ratio_median']}")
    typer.echo(f"  rollback: {r['rollback']}")


@bench_app.command("serve")
def bench_serve_cmd(
    edits: list[int] | None = typer.Option(None, "--edits", help="Live-edit counts to time (default: 1 10 100)."),
    requests: int = typer.Option(20, help="Generate requests timed per row (per client with --clients)."),
    clients: list[int] | None = typer.Option(
        None,
        "--clients",
        help="Also N concurrent clients (repeatable: --clients 1 --clients 8) with mixed versions: requests/s, "
        "p50 and p99 per client count, against the batching server and against one that does not batch.",
    ),
    versions: int | None = typer.Option(
        None,
        "--versions",
        help="Versions the concurrent clients mix (besides the base model; default: one per --edits count).",
    ),
    steps: int = typer.Option(
        25,
        help="Value-optimisation steps of the benchmark's edits (their quality does "
        "not matter here, their number does).",
    ),
    world: Path | None = WORLD,
    seed: int = SEED,
    device: str = DEVICE,
    as_json: bool = JSON,
) -> None:
    """Service latencies on the tiny model through gRPC: Generate with 0, 1, 10, 100 live edits; a version
    switch (rollback) next to a base-model reload; registry operation times."""
    from bench import serve as serve_bench

    from .cli_support import world_and_model

    console = stderr_console()
    folder, vlm = world_and_model(world, seed, device)
    try:
        r = serve_bench.run(
            vlm,
            folder,
            edit_counts=tuple(edits or (1, 10, 100)),
            requests=requests,
            steps=steps,
            clients=tuple(clients or ()),
            mixed_versions=versions,
            stage=stage_printer(console),
        )
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(r, indent=1))
        return
    typer.echo(
        f"Generate latency ({r['device']} {r['dtype']}, {r['torch_threads']} threads, "
        f"{r['requests']} requests per row, one at a time)"
    )
    typer.echo(f"  {'':34s} {'median ms':>10s} {'mean ms':>10s} {'p90 ms':>10s}")
    for name, row in r["generate"].items():
        typer.echo(f"  {name:34s} {row['median_ms']:10.2f} {row['mean_ms']:10.2f} {row['p90_ms']:10.2f}")
    s = r["switch"]
    typer.echo(
        f"version switch ({s['from_edits']} -> {s['to_edits']} live edits): attach + detach "
        f"{s['attach_and_detach_ms']:.3f} ms; rollback call + first answer "
        f"{s['rollback_and_first_answer_ms']:.1f} ms (bundle cold: {s['rollback_and_first_answer_cold_ms']:.1f} ms)"
    )
    typer.echo(
        f"  base-model reload {s['base_model_reload_ms']:.1f} ms: {s['reload_over_attach']}x the attach, "
        f"{s['reload_over_switch']}x the rollback ({s['reload_over_cold_switch']}x cold)"
    )
    if r.get("clients"):
        typer.echo(
            f"concurrent clients, the base model and {r['versions_mixed']} version(s) mixed "
            f"(batches of at most {r['batching']['max_batch_size']}, "
            f"waiting at most {r['batching']['batch_wait_ms']} ms)"
        )
    for row, ref in zip(r.get("clients", []), r.get("clients_unbatched", [])):
        typer.echo(
            f"{row['clients']:3d} client(s): {row['requests_per_s']:.1f} requests/s "
            f"({row['throughput_vs_1_client']}x one client; mean batch {row['mean_batch']}), "
            f"p50 {row['p50_ms']:.1f} ms, "
            f"p99 {row['p99_ms']:.1f} ms; without batching {ref['requests_per_s']:.1f} requests/s "
            f"({ref['throughput_vs_1_client']}x), p99 {ref['p99_ms']:.1f} ms"
        )
    typer.echo(
        "registry operations (ms): "
        + ", ".join(f"{k.removesuffix('_ms')} {v}" for k, v in r["registry"].items() if not isinstance(v, dict))
        + "; publish a version "
        + ", ".join(f"{n} edit(s) {v}" for n, v in r["registry"]["publish_ms"].items())
    )
