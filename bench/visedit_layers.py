"""``editlens bench visedit-layers``: VisEdit's metrics per VEAD layer (the paper's Table 2 on our model).

For every layer l a VEAD is trained at l (same steps, seed, data and signal
layer for all), then every chosen test case is edited on its own and scored
with its edit alone: reliability, text and modal generality, text and modal
locality (E-VQA, as ``bench editing``). The image read-out of the VEAD
recommendation is printed beside each layer: an adapter on visual states can
only act where the answer still depends on them.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from editors import metrics as M
from editors.request import EditRequest
from editors.visedit import VisEdit, VisEditSet
from editors.visedit.train import VisEditTrainConfig, train_visedit
from vlm.loading import VLM
from vlm.world.folder import WorldFolder

StageFn = Callable[[str], None]


def run(
    vlm: VLM,
    world_dir: str | Path,
    layers: list[int] | None = None,
    cases: int = 40,
    steps: int = 500,
    signal_layer: int | str = "auto",
    seed: int = 0,
    stage: StageFn | None = None,
) -> dict[str, Any]:
    """A VEAD trained at each layer and its single edits scored; returns a JSON-ready dict."""
    say = stage or (lambda s: None)
    world_dir = Path(world_dir)
    layers = list(range(vlm.num_layers)) if not layers else list(dict.fromkeys(layers))
    bad = [l for l in layers if not 0 <= l < vlm.num_layers]
    if bad:
        raise ValueError(f"layers {bad} outside 0..{vlm.num_layers - 1}")
    if cases < 1 or steps < 1:
        raise ValueError("--cases and --steps must be at least 1")
    t0 = time.time()
    chosen = M.spread_cases(M.load_cases(WorldFolder(world_dir).edit_cases_file("test")), cases)
    pixels = M.PixelCache(vlm, world_dir)
    cps = [M.case_prompts(vlm, c, pixels) for c in chosen]
    base = M.baseline(vlm, cps, M.specificity_panel(vlm, world_dir, pixels, 1, seed))
    requests = [EditRequest.from_case(c, world_dir, pixel_values=pixels(c["image"])) for c in chosen]
    out: dict[str, Any] = {"cases": len(chosen), "steps": steps, "seed": seed, "layers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for layer in layers:
            say(f"layer {layer}: training {steps} steps")
            summary = train_visedit(
                vlm,
                world_dir,
                Path(tmp) / f"layer-{layer}",
                VisEditTrainConfig(
                    layer=layer,
                    signal_layer=signal_layer,
                    steps=steps,
                    seed=seed,
                    eval_every=steps,
                    checkpoint_every=steps,
                ),
            )
            adapter = VisEditSet.load(summary["adapter_path"], vlm)
            say(f"layer {layer}: {len(chosen)} single edits")
            edits = VisEdit(vlm, adapter).edit_each(requests)
            s = M.summarise(M.evaluate_single_edits(vlm, cps, base, edits))["all"]
            readout = (summary.get("layer_evidence") or {}).get("details", {}).get("image_readout")
            out["layers"][layer] = {
                **{k: s[k] for k in M.EVQA + ("evqa_mean",)},
                "signal_layer": summary["adapter"]["signal_layer"],
                "best_validation_loss": summary["best_validation_loss"],
                "train_seconds": summary["train_seconds"],
                "image_readout": readout[layer] if readout else None,
            }
    out["seconds"] = round(time.time() - t0, 1)
    return out
