"""The influence mapper made visible (VisEdit Fig. 3): C over the edit image, another image of the
subject and an unrelated image, after one edit made from the edit image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diagnostics.attribution import image_grid
from diagnostics.render import render_overlays
from editors.request import EditRequest
from vlm.images import load_image
from vlm.loading import VLM
from vlm.patching import run_patched
from vlm.prompts import collate, encode

from .adapter import SignalBatch
from .edit_set import VisEditSet
from .editor import VisEdit, signal_state


@torch.no_grad()
def influence(vlm: VLM, edit_set: VisEditSet, image: Any, question: str, edit: int = -1) -> list[float]:
    """C = sigmoid(f1(h) · f2(h̄_last)) of edit ``edit`` on every visual token of ``image``."""
    vead = edit_set.vead
    p = encode(vlm.processor, question, image=image)
    key = signal_state(vead.config.layer)
    run = run_patched(
        vlm, collate([p], vlm.tokenizer.pad_token_id), capture=[key], stop_after_layer=max(vead.config.layer - 1, 0)
    )
    h = run.captured[key][0, p.image_positions].float().to(next(vead.parameters()).device)
    q = vead.prepare(SignalBatch([edit_set.signals[edit]], device=h.device))[3][0]
    return torch.sigmoid(vead.influence_logits(h, q)).tolist()


def influence_maps(
    vlm: VLM, adapter_path: str | Path, world_dir: str | Path, case: dict[str, Any], out: str | Path
) -> dict[str, Any]:
    """Edit with ``case`` (its edit image), then C over three images; writes the PNG."""
    world_dir = Path(world_dir)
    trained = VisEditSet.load(adapter_path, vlm)
    es = VisEdit(vlm, trained).edit([EditRequest.from_case(case, world_dir)])
    panels = []
    for field, question, label in (
        ("image", case["src"], "edit image"),
        ("image_rephrase", case["src"], "another image of the subject"),
        ("m_loc", case["m_loc_q"], "unrelated image"),
    ):
        scores = influence(vlm, es, world_dir / case[field], question)
        panels.append(
            {
                "title": label,
                "image": case[field],
                "scores": scores,
                "mean": sum(scores) / len(scores),
                "max": max(scores),
            }
        )
    grid = image_grid(len(panels[0]["scores"]))
    render_overlays(
        [load_image(world_dir / p["image"]) for p in panels],
        [p["scores"] for p in panels],
        [f"{p['title']}\nmean C {p['mean']:.2f}" for p in panels],
        out,
        grid,
        title=f"VisEdit influence mapper after editing {case['case_id']}: {case['src']} -> {case['alt']}",
        colorbar_label="edit intensity C",
    )
    return {"case": case["case_id"], "out": str(out), "panels": panels}


def mapper_separation(
    vlm: VLM, adapter_path: str | Path, world_dir: str | Path, cases: list[dict[str, Any]]
) -> dict[str, Any]:
    """How well the influence mapper tells the edit's subject from other images, over ``cases``: each case
    edited alone from its edit image, then the mean C over the edit image, another image of the subject
    and an unrelated image, and the share of cases whose unrelated image gets a lower mean C than each of
    the subject's images (1.0: the mapper always separates them; 0.5: chance)."""
    if not cases:
        raise ValueError("mapper_separation needs at least one case")
    world_dir = Path(world_dir)
    trained = VisEditSet.load(adapter_path, vlm)
    editor = VisEdit(vlm, trained)
    rows = []
    for case in cases:
        es = editor.edit([EditRequest.from_case(case, world_dir)])
        m = {}
        for field, question in (("image", case["src"]), ("image_rephrase", case["src"]), ("m_loc", case["m_loc_q"])):
            scores = influence(vlm, es, world_dir / case[field], question)
            m[field] = sum(scores) / len(scores)
        rows.append(m)
    n = len(rows)
    return {
        "cases": n,
        "mean_c_edit_image": sum(r["image"] for r in rows) / n,
        "mean_c_other_image_of_subject": sum(r["image_rephrase"] for r in rows) / n,
        "mean_c_unrelated_image": sum(r["m_loc"] for r in rows) / n,
        "separated_edit_image": sum(r["image"] > r["m_loc"] for r in rows) / n,
        "separated_other_image": sum(r["image_rephrase"] > r["m_loc"] for r in rows) / n,
    }
