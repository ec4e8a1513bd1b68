"""``editlens bench editing``: every registered editor (MultEdit, FT-L, VisEdit, ...) on the world's test
edit cases.

Editors come from the editor registry, configured with ``layer`` where their
config has one, the world's defaults (``EditorSpec.world_options``: VisEdit's
trained adapter, ``editlens visedit train``) and the run's ``overrides``. An
editor that cannot be configured for the world (VisEdit before any training)
is left out with a message unless it was named. VisEdit's edits are signals,
its "sequential" figure is N live edits at once, and the layer it acts on is
the adapter's own.

Three measurements per editor, all on the same cases and the same model:

1. Single edits: every case edited on its own from the base model and scored
   with only its edit attached; the E-VQA metrics and the paper's figures,
   over all cases and per case type (counterfactual / long-tail insertion).
2. Sequential edits: N cases with distinct (entity, relation) edited one
   after another, each on the model with the earlier edits attached; all N
   scored at checkpoints (after every N/5 edits) and at the end, to show how
   fast quality decays as edits pile up.
3. Latency: a few edits timed one at a time (unbatched), split into key,
   value optimisation and update for MultEdit; the edit-set file size per
   edit, for one edit and for the N sequential ones.

The locality references and the specificity panel are scored once on the
base model before any edit.

Beside the E-VQA five (not in their mean), two harder probes: modal
generality on a rendering of the edited subject never used in training
(``modal_generality_heldout``, the cases' ``image_heldout``) and modal
locality on a near neighbour (``modal_locality_near``: the edit question on
an image of another subject whose look differs from the edited subject's in
exactly one attribute, ``vlm.world.stream.NearNeighbours``; agreement with
the base model's answer); each with how many cases it was computed on
(``..._cases``; a case without a held-out rendering or a neighbour is left
out of that figure, and in the sequential run so is a neighbour whose asked
fact one of the edits rewrote). ``near_neighbours`` says how many of the
chosen cases have a neighbour, by the attribute that differs and by where it
comes from (the world's known or unseen entities, or the edit stream's new
ones, drawn into a scratch folder when the stream has not drawn them yet).
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from editors import editor_names, get_editor
from editors import metrics as M
from editors.files import EditSetError
from editors.request import EditRequest
from vlm.loading import VLM
from vlm.options import ConfigError
from vlm.world.folder import WorldFolder

from .harness import StageFn, TickFn, near_summary, sayer, scratch, with_near_neighbours, world_header


def make_editor(name: str, vlm: VLM, layer: int, world_dir: Path, options: dict[str, Any] | None = None):
    """Editor ``name`` of the editor registry, configured for this run: ``layer`` where its config has one,
    the world's defaults (``EditorSpec.world_options``: e.g. VisEdit's trained adapter) and ``options``."""
    spec = get_editor(name)
    fields = {f.name for f in dataclasses.fields(spec.config_class)}
    settings = {"layer": layer} if "layer" in fields else {}
    settings.update(spec.world_options(world_dir) if spec.world_options else {})
    settings.update(options or {})
    return spec.create(vlm, spec.config(vlm, **settings))


def distinct_facts(cases: list[dict[str, Any]], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Up to ``n`` cases, shuffled with ``seed``, no two about the same (entity, relation)."""
    order = list(cases)
    random.Random(f"sequential-{seed}").shuffle(order)
    seen, out = set(), []
    for c in order:
        key = (c["entity"], c["relation"])
        if key not in seen:
            seen.add(key)
            out.append(c)
        if len(out) == n:
            break
    return out


def _requests(cases, world_dir: Path, pixels: M.PixelCache) -> list[EditRequest]:
    return [EditRequest.from_case(c, world_dir, pixel_values=pixels(c["image"]), variants=False) for c in cases]


def _single(editor, vlm, cps, base, requests, tick: TickFn | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    edits = editor.edit_each(requests, batch_size=32)
    t_edit = time.perf_counter() - t0
    rows = M.evaluate_single_edits(vlm, cps, base, edits, progress=tick)
    return {"summary": M.summarise(rows), "edit_seconds_batched": round(t_edit, 2), "rows": rows}


def near_by_attribute(cps: list[M.CasePrompts], rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``modal_locality_near`` over the cases whose neighbour differs in each look attribute (and how many)."""
    out: dict[str, dict[str, Any]] = {}
    for cp, row in zip(cps, rows):
        if "modal_locality_near" in row:
            out.setdefault(cp.case["near_attribute"], []).append(row["modal_locality_near"])
    return {a: {"cases": len(v), "modal_locality_near": sum(v) / len(v)} for a, v in sorted(out.items())}


def _sequential(editor, vlm, world_dir, pixels, base_cases, n: int, panel, seed: int) -> dict[str, Any]:
    chosen = distinct_facts(base_cases, n, seed)
    cps = [M.case_prompts(vlm, c, pixels) for c in chosen]
    base = M.baseline(vlm, cps, panel)
    requests = _requests(chosen, world_dir, pixels)
    step = max(1, len(chosen) // 5)
    marks = sorted(set(list(range(step, len(chosen) + 1, step)) + [len(chosen)]))
    curve, current, done = [], None, 0
    t0 = time.perf_counter()
    for mark in marks:
        current = editor.edit_sequentially(requests[done:mark], onto=current)
        done = mark
        rows = M.evaluate_together(
            vlm,
            cps[:mark],
            base.upto(mark),
            current,
        )
        s = M.summarise(rows)["all"]
        curve.append(
            {
                "edits": mark,
                **{k: s[k] for k in M.EVQA + ("evqa_mean",)},
                **{k: s[k] for k in M.EXTRA + tuple(M.EXTRA_CASES.values()) if k in s},
            }
        )
    seconds = time.perf_counter() - t0
    final = M.summarise(M.evaluate_together(vlm, cps, base, current))
    out = {"edits": len(chosen), "final": final, "curve": curve, "seconds": round(seconds, 1)}
    with tempfile.TemporaryDirectory() as d:
        size = current.save(Path(d) / "seq.safetensors")
    out["file_bytes"] = size
    out["file_bytes_per_edit"] = round(size / current.num_edits, 1)
    return out


def _latency(editor, vlm, requests: list[EditRequest]) -> dict[str, Any]:
    """Edits one at a time, unbatched; the split of each edit's time is its record's (``seconds``: key, value
    and update for MultEdit, the signal for VisEdit, the training for FT-L)."""
    parts: dict[str, list[float]] = {}
    totals = []
    size = None
    for req in requests:
        t0 = time.perf_counter()
        es = editor.edit([req])
        totals.append(time.perf_counter() - t0)
        for key, sec in es.records[-1].get("seconds", {}).items():
            parts.setdefault(key, []).append(sec)
        if size is None:
            with tempfile.TemporaryDirectory() as d:
                size = es.save(Path(d) / "one.safetensors")

    def ms(v):
        return round(1000 * sum(v) / len(v), 2) if v else None

    return {
        "edits_timed": len(requests),
        "total_ms": ms(totals),
        **{f"{key}_ms": ms(v) for key, v in parts.items()},
        "single_edit_file_bytes": size,
    }


def run(
    vlm: VLM,
    world_dir: str | Path,
    editors: list[str] | None = None,
    cases: int | None = None,
    sequential: int = 50,
    layer: int = 0,
    panel_size: int = 40,
    latency_edits: int = 10,
    seed: int = 0,
    overrides: dict[str, dict[str, Any]] | None = None,
    stage: StageFn | None = None,
    tick: TickFn | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-ready dict (see the module docstring)."""
    say = sayer(stage)
    world_dir = Path(world_dir)
    named = editors is not None
    editors = list(dict.fromkeys(editors or editor_names()))
    for e in editors:
        get_editor(e)  # an unknown name fails here, before any work
    if not 0 <= layer < vlm.num_layers:
        raise ValueError(f"layer {layer} is outside 0..{vlm.num_layers - 1}")
    if (cases is not None and cases < 1) or sequential < 0 or panel_size < 1 or latency_edits < 0:
        raise ValueError("--cases and --panel must be at least 1; --sequential and --latency-edits at least 0")
    built = {}
    for name in editors:
        try:
            built[name] = make_editor(name, vlm, layer, world_dir, (overrides or {}).get(name))
        except (ConfigError, EditSetError) as exc:
            if named:
                raise
            say(f"{name} left out: {exc}")
    t_start = time.time()
    all_cases = M.load_cases(WorldFolder(world_dir).edit_cases_file("test"))
    pixels = M.PixelCache(vlm, world_dir)
    with scratch("editing") as near_dir:  # neighbours' drawings the world has not made, processed while there
        all_cases = with_near_neighbours(world_dir, all_cases, near_dir, pixels)
    chosen = all_cases if cases is None else M.spread_cases(all_cases, cases)
    say(f"scoring the base model on {len(chosen)} cases")
    cps = [M.case_prompts(vlm, c, pixels) for c in chosen]
    panel = M.specificity_panel(vlm, world_dir, pixels, panel_size, seed)
    base = M.baseline(vlm, cps, panel)
    requests = _requests(chosen, world_dir, pixels)
    result: dict[str, Any] = {
        **world_header(vlm, world_dir, layer),
        "cases": len(chosen),
        "specificity_panel": len(panel),
        "near_neighbours": near_summary(chosen),
        "heldout_renderings": sum(bool(c.get("image_heldout")) for c in chosen),
        "editors": {},
    }
    for name, editor in built.items():
        entry: dict[str, Any] = {"hyperparameters": editor.hyperparameters("single")}
        say(f"{name}: {len(chosen)} single edits")
        single = _single(editor, vlm, cps, base, requests, tick)
        entry["single"] = single["summary"]
        entry["single_edit_seconds_batched"] = single["edit_seconds_batched"]
        entry["per_case"] = single["rows"]
        entry["single_near_by_attribute"] = near_by_attribute(cps, single["rows"])
        if sequential:
            say(f"{name}: {sequential} sequential edits")
            entry["sequential"] = _sequential(editor, vlm, world_dir, pixels, all_cases, sequential, panel, seed)
        if latency_edits:
            say(f"{name}: timing {latency_edits} edits one at a time")
            entry["latency"] = _latency(editor, vlm, requests[:latency_edits])
        result["editors"][name] = entry
    result["seconds"] = round(time.time() - t_start, 1)
    return result
