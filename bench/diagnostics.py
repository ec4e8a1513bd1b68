"""``editlens bench diagnostics``: the batched engine against the naive reference, and the ground truth.

Speed. For each case the same diagnostic is computed three ways in one
process: ``naive`` (one full forward pass of the whole model per cell, no
cache), ``uncached`` (cells batched, embeddings computed once) and
``batched`` (plus the prefix before the first intervened position computed
once and reused through the key/value cache). Every way computes the same
cells (restoring a position before the first corrupted token is the
identity; all three skip those cells alike), and the largest absolute
difference of their outputs is printed beside the times. The headline is
the full token-replacement trace grid: every text position and image
block × every layer × 3 kinds.

Ground truth. A new fact is inserted with MultEdit at layer k (the world's
insertion cases: entities the model has never seen, whose answer's first
token it gives with P < 0.1); then the token-replacement trace of the new answer, MLP
kind, window 1, at the constraint's last token must peak at layer k. The
edit's trace (``trace.edit_trace``) restores the edited model's clean
states into the base model's corrupted run, minus the same with the base
model's states; beside it, the plain and the isolated trace run wholly on
the edited model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diagnostics.attention import attention_contributions
from diagnostics.attribution import module_attribution, visual_attribution
from diagnostics.cases import DiagnosticCase, load_cases, prepare
from diagnostics.knockout import RELATIONS, knockout
from diagnostics.trace import causal_trace, edit_trace, noise_trace
from editors.attach import attach
from editors.metrics import spread_cases
from editors.multedit import MultEdit, MultEditConfig
from editors.request import EditRequest
from vlm.loading import VLM
from vlm.world.folder import WorldFolder


def _flat(result: Any) -> torch.Tensor:
    """Every number of a diagnostic result, flattened (to compare two engines)."""
    if hasattr(result, "effects"):
        vals = [v for k in result.kinds for row in result.effects[k] for v in row] + [result.p_corrupt]
    elif hasattr(result, "curves"):
        vals = [v for c in result.curves.values() for v in c]
    elif hasattr(result, "maps"):
        vals = [v for m in result.maps for v in m]
    elif hasattr(result, "mlp"):
        vals = result.attention + result.mlp
    else:
        vals = [v for row in result.visual + result.constraint for v in row]
    return torch.tensor(vals, dtype=torch.float64)


DIAGNOSTICS: dict[str, Callable] = {
    "trace": lambda vlm, c, mode, bs: causal_trace(vlm, c, mode=mode, batch_size=bs),
    "noise-trace": lambda vlm, c, mode, bs: noise_trace(vlm, c, samples=3, mode=mode, batch_size=bs),
    "knockout": lambda vlm, c, mode, bs: knockout(vlm, c, relations=RELATIONS, mode=mode, batch_size=bs),
    "visual-attribution": lambda vlm, c, mode, bs: visual_attribution(vlm, c, samples=1, mode=mode, batch_size=bs),
    "contributions": lambda vlm, c, mode, bs: attention_contributions(vlm, c, mode=mode),
    "module-attribution": lambda vlm, c, mode, bs: module_attribution(vlm, c, mode=mode),
}


def speed(
    vlm: VLM,
    cases: list[DiagnosticCase],
    which: list[str],
    batch_size: int = 256,
    say: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """One diagnostic's batched, uncached and naive runs over ``cases``: times and the largest difference."""
    out: dict[str, Any] = {}
    for name in which:
        fn = DIAGNOSTICS[name]
        times = dict.fromkeys(("naive", "uncached", "batched"), 0.0)
        diff, cells, passes = 0.0, 0, dict.fromkeys(times, 0)
        for i, case in enumerate(cases):
            say(f"{name}: case {i + 1}/{len(cases)}")
            results = {}
            for mode in ("batched", "uncached", "naive"):  # batched first: warm-up costs fall on it
                t0 = time.perf_counter()
                results[mode] = fn(vlm, case, mode, batch_size)
                times[mode] += time.perf_counter() - t0
                passes[mode] += getattr(results[mode], "forward_passes", 0)
            ref = _flat(results["naive"])
            diff = max(
                diff,
                float((_flat(results["batched"]) - ref).abs().max()),
                float((_flat(results["uncached"]) - ref).abs().max()),
            )
            cells += getattr(results["batched"], "cells", 0)
        out[name] = {
            "cases": len(cases),
            "cells": cells,
            "forward_passes": passes,
            "seconds": times,
            "speedup": times["naive"] / times["batched"],
            "speedup_uncached": times["naive"] / times["uncached"],
            "max_abs_diff": diff,
        }
    return out


def new_facts(vlm: VLM, world_dir: Path, records: list[dict], max_prob: float = 0.1) -> list[dict]:
    """The insertion cases whose answer the base model does not know: P(its first token) < ``max_prob``
    (the quantity the traces measure; years share first tokens).

    A fact the base model already (half) gives is written at its own layer, and a
    trace rightly finds that one."""
    out = []
    for c in records:
        if c["type"] != "insertion":
            continue
        case = DiagnosticCase(c["src"], c["constraint"], image=world_dir / c["image"], answer=c["alt"])
        if prepare(vlm, case).p_clean < max_prob:
            out.append(c)
    return out


def ground_truth(
    vlm: VLM, world_dir: Path, layers: list[int], cases: int, say: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """Insert each insertion case at each layer k; does the MLP indirect effect peak at k?"""
    world = WorldFolder(world_dir)
    records = new_facts(vlm, world_dir, world.edit_cases("test"))
    chosen = spread_cases(records, cases) if cases < len(records) else records
    phrases = world.phrases()
    per_layer: dict[int, dict[str, Any]] = {}
    for k in layers:
        editor = MultEdit(vlm, MultEditConfig(layer=k))
        hits = {"edit": 0, "plain": 0, "isolated": 0}
        peaks: dict[str, list[int]] = {name: [] for name in hits}
        curves: dict[str, list[float]] = {name: [0.0] * vlm.num_layers for name in hits}
        edited, took_hits = 0, 0
        for i, rec in enumerate(chosen):
            say(f"ground truth: layer {k}, case {i + 1}/{len(chosen)}")
            req = EditRequest.from_case(rec, world_dir)
            es = editor.edit([req])
            case = DiagnosticCase(
                rec["src"],
                rec["constraint"],
                image=world_dir / rec["image"],
                answer=rec["alt"],
                label=rec["case_id"],
                replacements=[p for p in phrases if rec["entity_name"] not in p],
            )
            # the edit's trace: clean states from the edited model, corrupted runs on the base model;
            # and, for comparison, both runs on the edited model (plain and isolated)
            for name in ("edit", "plain", "isolated"):
                if name == "edit":
                    r = edit_trace(vlm, case, lambda es=es: attach(vlm, es), kinds=["mlp"], roles=["constraint last"])
                else:
                    with attach(vlm, es):
                        r = causal_trace(
                            vlm, case, kinds=["mlp"], roles=["constraint last"], isolate=name == "isolated"
                        )
                effect = r.effects["mlp"][0]
                curves[name] = [c + e / len(chosen) for c, e in zip(curves[name], effect)]
                peak = max(range(len(effect)), key=lambda l: effect[l])
                peaks[name].append(peak)
                hits[name] += peak == k
            took = es.records[0]["metrics"]["p_after"] > 0.5
            edited += took
            took_hits += took and peaks["edit"][-1] == k
        per_layer[k] = {
            "cases": len(chosen),
            "edits_that_took": edited / len(chosen),
            "peak_at_k_of_edits_that_took": took_hits / max(1, edited),
            **{f"peak_at_k_{name}": hits[name] / len(chosen) for name in hits},
            **{f"peaks_{name}": peaks[name] for name in peaks},
            **{f"mean_effect_{name}": curves[name] for name in curves},
        }
    n = sum(v["cases"] for v in per_layer.values())
    return {
        "layers": per_layer,
        **{
            f"peak_at_k_{name}": sum(v[f"peak_at_k_{name}"] * v["cases"] for v in per_layer.values()) / n
            for name in ("edit", "plain", "isolated")
        },
    }


def run(
    vlm: VLM,
    world_dir: str | Path,
    cases: int = 5,
    which: list[str] | None = None,
    batch_size: int = 256,
    ground_truth_cases: int = 10,
    ground_truth_layers: list[int] | None = None,
    stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The engine's speed against the naive loop and the ground truth; returns a JSON-ready dict."""
    say = stage or (lambda s: None)
    world_dir = Path(world_dir)
    which = which or list(DIAGNOSTICS)
    bad = [w for w in which if w not in DIAGNOSTICS]
    if bad:
        raise ValueError(f"unknown diagnostic(s) {bad}; choose from {list(DIAGNOSTICS)}")
    if cases < 1:
        raise ValueError("--cases must be at least 1")
    t0 = time.time()
    all_cases = load_cases(WorldFolder(world_dir).edit_cases_file("test"), vlm=vlm)
    chosen = all_cases[:: max(1, len(all_cases) // cases)][:cases]  # spread over the file
    out: dict[str, Any] = {
        "model": str(vlm.path),
        "device": str(vlm.input_device),
        "dtype": str(vlm.dtype),
        "batch_size": batch_size,
        "speed": speed(vlm, chosen, which, batch_size, say),
    }
    if ground_truth_cases > 0:
        layers = ground_truth_layers if ground_truth_layers is not None else [0, 1, 2, 3]
        out["ground_truth"] = ground_truth(vlm, world_dir, layers, ground_truth_cases, say)
    out["seconds"] = time.time() - t0
    return out


def render_ground_truth(gt: dict[str, Any], path: str | Path) -> Path:
    """Heatmap: one row per (trace, edited layer k) with the mean MLP indirect effect at the
    constraint's last token per layer; each label names the layer where the row peaks."""
    from diagnostics.render import render_matrix

    rows, labels = [], []
    for name in ("edit", "isolated", "plain"):
        for k, v in gt["layers"].items():
            curve = v[f"mean_effect_{name}"]
            peak = max(range(len(curve)), key=curve.__getitem__)
            top = curve[peak] if curve[peak] > 0 else 1.0
            rows.append([c / top for c in curve])
            labels.append(f"{name} trace, edited at {k}: peak {peak} ({curve[peak]:.3f})")
    return render_matrix(
        rows,
        labels,
        [str(l) for l in range(len(rows[0]))],
        path,
        title="ground truth: MLP indirect effect at the constraint's last token\n"
        "after a MultEdit insertion at layer k (mean over cases, each row / its peak)",
        colorbar_label="effect / row peak",
    )
