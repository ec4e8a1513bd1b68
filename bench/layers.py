"""``editlens bench layers``: MultEdit efficacy per edited layer (the paper's Fig. 14).

The same cases are edited at every decoder layer in turn (single edits, each
from the base model, at the constraint's last token) and scored for
efficacy (mean P(O*)), reliability and both generalities; the paper finds
the early causal layers best and later layers still non-trivial.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from editors import metrics as M
from editors.multedit import MultEdit, MultEditConfig
from editors.request import EditRequest
from vlm.loading import VLM
from vlm.world.folder import WorldFolder

FIELDS = (
    "efficacy",
    "generalisation",
    "modal_generalisation",
    "reliability",
    "text_generality",
    "modal_generality",
    "text_locality",
    "modal_locality",
)


def run(
    vlm: VLM,
    world_dir: str | Path,
    cases: int = 40,
    layers: list[int] | None = None,
    overrides: dict[str, Any] | None = None,
    stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """MultEdit single edits of the same cases at each layer; returns a JSON-ready dict."""
    say = stage or (lambda s: None)
    world_dir = Path(world_dir)
    layers = list(range(vlm.num_layers)) if not layers else layers
    bad = [l for l in layers if not 0 <= l < vlm.num_layers]
    if bad:
        raise ValueError(f"layers {bad} outside 0..{vlm.num_layers - 1}")
    if cases < 1:
        raise ValueError("--cases must be at least 1")
    t0 = time.time()
    all_cases = M.load_cases(WorldFolder(world_dir).edit_cases_file("test"))
    chosen = M.spread_cases(all_cases, cases) if cases < len(all_cases) else all_cases
    pixels = M.PixelCache(vlm, world_dir)
    cps = [M.case_prompts(vlm, c, pixels) for c in chosen]
    base = M.baseline(vlm, cps, M.specificity_panel(vlm, world_dir, pixels, 20))
    requests = [EditRequest.from_case(c, world_dir, pixel_values=pixels(c["image"])) for c in chosen]
    rows = []
    for layer in layers:
        say(f"editing layer {layer}")
        editor = MultEdit(vlm, MultEditConfig(layer=layer, **(overrides or {})))
        edits = editor.edit_each(requests, batch_size=32)
        s = M.summarise(M.evaluate_single_edits(vlm, cps, base, edits))["all"]
        rows.append({"layer": layer, **{k: s[k] for k in FIELDS}})
    best = max(rows, key=lambda r: r["efficacy"])
    return {
        "cases": len(chosen),
        "hyperparameters": editor.hyperparameters("single"),
        "layers": rows,
        "best_layer": best["layer"],
        "seconds": round(time.time() - t0, 1),
    }
