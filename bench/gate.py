"""What KeyGate's gate costs a Generate call, by the number of live edit keys (``editlens bench gate``).

The gate compares each token's ``down_proj`` input with the edit keys and the guarding reference keys (the
preservation statistics' keys, thousands whatever the number of edits). Two ways to decide the same thing are
timed round-robin against the base model in one run, on the same prompts: the joint scan of edits and
references (``Gate.firing_joint``, the definition) and the edit keys first, the references only at tokens an
edit key accepts (``Gate.firing``, what serves). The edit keys are the real gate's first edit plus random keys
about the real keys' centre and spread (they stay shut, as the keys of other subjects' edits do on most
prompts), so any number of them costs no editing time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from editors import get_editor
from editors.keygate import Gate
from editors.request import EditRequest
from vlm.prompts import encode
from vlm.scoring import generate
from vlm.world.stream import edit_stream, load_world, render_stream_images


def run(
    vlm,
    world_dir: str | Path,
    edits: Sequence[int] = (1, 100, 1000, 10000),
    layer: int = 0,
    rounds: int = 6,
    prompts: int = 5,
    new_tokens: int = 4,
    stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    say = stage or (lambda s: None)
    world_dir = Path(world_dir)
    if not edits or min(edits) < 1 or rounds < 2 or prompts < 1:
        raise ValueError("--edits must be >= 1, --rounds >= 2 and --prompts >= 1")
    records = edit_stream(load_world(world_dir), prompts + 1)
    render_stream_images(world_dir, records)
    say("one real KeyGate edit (its gate: centre, threshold, reference keys)")
    spec = get_editor("keygate")
    edit_set = spec.create(vlm, spec.config(vlm, layer=layer)).edit_sequentially(
        [EditRequest.from_case(records[0], world_dir)]
    )
    real = edit_set.gates[0]
    probe = [encode(vlm.processor, r["src"], image=world_dir / r["image"]) for r in records[1:]]
    gen = torch.Generator().manual_seed(0)
    rules = {"joint": Gate.firing_joint, "edits_first": Gate.firing}
    out: dict[str, Any] = {"layer": layer, "reference_keys": int(real.reference.shape[0]), "rows": []}
    try:
        for n in edits:
            say(f"{n} edit key(s)")
            extra = real.mean + torch.randn(n, real.keys.shape[1], generator=gen) * real.keys.std()
            keys = torch.cat([real.keys, extra])[:n]
            edit_set.gates[0] = replace(real, keys=keys, entry_of=torch.zeros(n, dtype=torch.int64), _cache=None)
            times: dict[str, list[float]] = {"base": [], **{k: [] for k in rules}}
            for r in range(rounds):  # round-robin; the first round warms up and is not counted
                for name in times:
                    for p in probe:
                        t0 = time.perf_counter()
                        if name == "base":
                            generate(vlm, [p], max_new_tokens=new_tokens)
                        else:
                            Gate.firing = rules[name]
                            with edit_set.attach(vlm):
                                generate(vlm, [p], max_new_tokens=new_tokens)
                        if r:
                            times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1000 for k, v in times.items()}
            out["rows"].append(
                {
                    "edit_keys": n,
                    "base_ms": round(med["base"], 2),
                    **{f"{k}_ms": round(med[k], 2) for k in rules},
                    **{f"{k}_ratio": round(med[k] / med["base"], 3) for k in rules},
                }
            )
    finally:
        Gate.firing = rules["edits_first"]
    return out
