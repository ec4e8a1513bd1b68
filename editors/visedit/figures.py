"""The influence mapper made visible (VisEdit Fig. 3): C over the edit image, another image of the
subject and an unrelated image, after one edit made from the edit image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diagnostics.render import render_overlays
from editors.request import EditRequest
from vlm.images import load_image, process_image
from vlm.loading import VLM
from vlm.patching import run_patched
from vlm.prompts import collate, encode, token_grid

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
    grid = token_grid(len(panels[0]["scores"]))
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


GATE_PROBES = (
    ("edit image", "image"),
    ("another rendering", "image_rephrase"),
    ("held-out rendering", "image_heldout"),
    ("unrelated image", "m_loc"),
    ("similar-looking entity", None),
)


def similar_look(world_dir: str | Path, entity: str, seed: int = 0):
    """A rendering of a look like ``entity``'s (same kind, shape and colours) but with another pattern,
    drawn for the purpose (no entity of the world has it unless by chance)."""
    import random

    from vlm.world.folder import WorldFolder
    from vlm.world.render import PATTERNS, render_entity

    spec = WorldFolder(world_dir).spec()
    ent = next(e for e in spec["entities"] if e["id"] == entity)
    rng = random.Random(f"similar-{seed}-{entity}")
    look = dict(ent["look"], pattern=rng.choice([p for p in PATTERNS if p != ent["look"]["pattern"]]))
    return render_entity(ent["kind"], look, f"similar-{seed}-{entity}")


def gate_map(
    vlm: VLM, adapter_path: str | Path, world_dir: str | Path, cases: list[dict[str, Any]], out: str | Path
) -> dict[str, Any]:
    """The scope gate (``scope.py``) after one edit per test case: the cosine of each probe image's key with
    the edit image's key, and whether the gate opens for it (threshold, references and claims included),
    for the edit image, another rendering, a held-out rendering, the unrelated image and a similar-looking
    entity (same shape and colours, another pattern). A strip plot per probe with the threshold drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .calibration import keys_of_images, visual_states

    world_dir = Path(world_dir)
    trained = VisEditSet.load(adapter_path, vlm)
    if trained.scope is None:
        raise ValueError(f"{adapter_path} has no scope gate; run `editlens visedit calibrate` first")
    editor = VisEdit(vlm, trained)
    singles = editor.edit_each([EditRequest.from_case(c, world_dir) for c in cases])
    rows: dict[str, list[tuple[float, bool]]] = {name: [] for name, _ in GATE_PROBES}
    layer = trained.config.layer
    for case, one in zip(cases, singles):
        images = [
            load_image(world_dir / case[field]) if field else similar_look(world_dir, case["entity"])
            for _, field in GATE_PROBES
            if not field or case.get(field)
        ]
        names = [name for name, field in GATE_PROBES if not field or case.get(field)]
        pix = [process_image(vlm.processor, im) for im in images]
        keys = keys_of_images(vlm, trained.vead, pix)
        opened = one.image_gate()(visual_states(vlm, layer, pix).to(vlm.input_device)).cpu()[:, 0]
        cos = keys @ one.signals[0].key.float()
        for name, c, o in zip(names, cos.tolist(), opened.tolist()):
            rows[name].append((c, bool(o)))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, vals in enumerate(rows.values()):
        jitter = torch.linspace(-0.25, 0.25, max(len(vals), 1)).tolist()
        ax.scatter(
            [i + j for j in jitter[: len(vals)]],
            [c for c, _ in vals],
            c=["tab:red" if o else "tab:grey" for _, o in vals],
            s=12,
        )
    ax.axhline(trained.scope.threshold, color="k", lw=1, ls="--", label=f"threshold τ = {trained.scope.threshold:.3f}")
    ax.set_xticks(range(len(rows)), list(rows), rotation=15)
    ax.set_ylabel("cosine with the edit image's key")
    ax.set_title(f"VisEdit scope gate over {len(cases)} test cases (red: the gate opens)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    summary = {
        name: {
            "cases": len(vals),
            "mean_cos": round(sum(c for c, _ in vals) / len(vals), 4) if vals else None,
            "opens": round(sum(o for _, o in vals) / len(vals), 4) if vals else None,
        }
        for name, vals in rows.items()
    }
    return {"out": str(out), "threshold": trained.scope.threshold, "cases": len(cases), "probes": summary}
