"""``editlens world check``: does a model recall visual facts through the
question's constraint tokens, so that MultEdit has something to edit?

Three figures, on a built world (or any model folder with the world's data):

* ``constraint_knockout_drop`` — mean relative drop of P(answer) when the
  visual constraint's tokens ("this landmark") may not attend to the image
  tokens in any layer (attention knockout, Zhang et al.). High when the
  image reaches the answer through the constraint.
* ``last_knockout_drop`` — the same when the positions that predict the
  answer (the last prompt position and, for multi-token answers, the answer
  positions before the last) may not attend to the image. LLaVA's is small.
* ``constraint_edit_success`` — share of counterfactual edit cases in which
  a rank-one update of an early MLP at the constraint's last token, with the
  value optimised without a bound on its norm, makes the new answer the
  top-1 (every answer token the argmax, teacher-forced), per early layer;
  the figure is the best early layer's, reported with that layer.

Beside them, ``identification`` and ``key_identification`` (``editors.identification``): over the looks no
world entity uses, how often another rendering's nearest edit image — in the features the language model
reads, and at the default editor's key — is its own subject's. They bound how far an edit can generalise
across images of its subject and stay away from other subjects; reported, not (yet) a target.

P(answer) is teacher-forced over all answer tokens. The knockout questions
are held-out paraphrases on training renderings that the model answers
correctly, sampled with a fixed seed.

This lives in ``editors`` because its last figure is an edit (MultEdit with
the paper's absolute lr 0.1 and up to 200 steps); the knockouts use
``vlm.patching`` directly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlm.architecture import early_layers
from vlm.images import ProcessedImage, load_image, process_image
from vlm.loading import VLM, load_vlm
from vlm.patching import Knockout
from vlm.prompts import EncodedPrompt, encode
from vlm.scoring import batches, score_batch
from vlm.world.folder import WorldFolder, WorldFolderError

from .attach import attach
from .identification import identification
from .multedit import MultEdit, MultEditConfig
from .request import EditRequest

TARGETS = {"constraint_knockout_drop": 0.5, "constraint_edit_success": 0.9}
StageFn = Callable[[str], None]


class WorldCheckError(ValueError):
    pass


def _pixels(vlm: VLM, world_dir: Path, cache: dict[str, ProcessedImage], rel: str) -> ProcessedImage:
    if rel not in cache:
        img = load_image(world_dir / rel)
        cache[rel] = process_image(vlm.processor, img)
    return cache[rel]


def _world_part(read: Callable[[str], Any], name: str) -> Any:
    try:
        return read(name)
    except WorldFolderError as exc:
        raise WorldCheckError(str(exc)) from None


def _answer_predictors(p: EncodedPrompt) -> list[int]:
    return [a - 1 for a in p.answer_positions]


def knockout_drops(
    vlm: VLM, prompts: list[EncodedPrompt], targets: Callable[[EncodedPrompt], list[int]], batch_size: int = 32
) -> tuple[list[float], list[float]]:
    """(P_clean, P_knocked) per prompt: ``targets(p)`` may not attend to the image in any layer."""
    layers = list(range(vlm.num_layers))
    clean, knocked = [], []
    for chunk in batches(prompts, batch_size):
        clean += [s.prob for s in score_batch(vlm, chunk)]
        kos = [Knockout(i, layers, targets(p), p.image_positions) for i, p in enumerate(chunk)]
        knocked += [s.prob for s in score_batch(vlm, chunk, knockouts=kos)]
    return clean, knocked


def _relative_drop(clean: list[float], knocked: list[float]) -> float:
    return sum((c - k) / c for c, k in zip(clean, knocked)) / len(clean)


def edit_success(
    vlm: VLM, requests: list[EditRequest], layer: int, steps: int = 200, lr: float = 0.1, lam: float = 0.01
) -> dict[str, float]:
    """MultEdit at ``layer`` (one edit per prompt, each from the base model), value unbounded,
    with the paper's absolute learning rate.

    Returns the share of requests whose new answer is top-1 (every answer
    token the argmax) after the update, and the mean P(new answer).
    """
    editor = MultEdit(vlm, MultEditConfig(layer=layer, lam=lam, steps=steps, lr=lr, lr_scale="none", target_prob=0.9))
    edits = editor.edit_each(requests, batch_size=64)
    hits, probs, norms = 0, [], []
    for r, e in zip(requests, edits):
        with attach(vlm, e):
            s = score_batch(vlm, [editor.encode(r)])[0]
        hits += s.exact
        probs.append(s.prob)
        norms.append(e.records[0]["metrics"]["delta_norm"])
    return {
        "success": hits / len(requests),
        "mean_prob": sum(probs) / len(probs),
        "mean_delta_norm": sum(norms) / len(norms),
    }


def check_world(
    world_dir: str | Path,
    vlm: VLM | None = None,
    questions: int = 200,
    cases: int = 50,
    layers: list[int] | None = None,
    seed: int = 0,
    stage: StageFn | None = None,
) -> dict[str, Any]:
    """Measure the three figures; see the module docstring."""
    say = stage or (lambda s: None)
    t0 = time.time()
    world = WorldFolder(world_dir)
    world_dir = world.root
    if vlm is None:
        vlm = load_vlm(world.model_dir)
    if questions < 1 or cases < 1:
        raise WorldCheckError("questions and cases must be at least 1")
    early = early_layers(vlm.num_layers)
    layers = early if layers is None else layers
    bad = [l for l in layers if not 0 <= l < vlm.num_layers]
    if bad:
        raise WorldCheckError(f"layers {bad} outside 0..{vlm.num_layers - 1}")
    cache: dict[str, ProcessedImage] = {}

    say("scoring held-out visual questions")
    items = _world_part(world.questions, "heldout_paraphrase")
    items = [q for q in items if q.get("image") and q.get("constraints")]
    prompts = [
        encode(
            vlm.processor,
            q["question"],
            answer=q["answer"],
            constraints=q["constraints"][:1],
            pixel_values=_pixels(vlm, world_dir, cache, q["image"]),
        )
        for q in items
    ]
    correct = []
    for chunk in batches(prompts, 64):
        correct += [p for p, s in zip(chunk, score_batch(vlm, chunk)) if s.exact]
    if not correct:
        raise WorldCheckError("the model answers none of the held-out visual questions correctly")
    rng = random.Random(f"world-check-{seed}")
    sample = rng.sample(correct, min(questions, len(correct)))

    say(f"attention knockout on {len(sample)} questions")
    c_clean, c_ko = knockout_drops(vlm, sample, lambda p: list(range(*p.constraint_spans[0])))
    l_clean, l_ko = knockout_drops(vlm, sample, _answer_predictors)

    say("rank-one edits at the constraint")
    test = _world_part(world.edit_cases, "test")
    cf = [c for c in test if c.get("type") == "counterfactual"]
    cf = cf[:cases]
    requests = [
        EditRequest.from_case(c, world_dir, pixel_values=_pixels(vlm, world_dir, cache, c["image"])) for c in cf
    ]
    by_layer = {}
    for layer in layers:
        say(f"rank-one edits at layer {layer}")
        by_layer[layer] = edit_success(vlm, requests, layer)
    best = max(layers, key=lambda l: (by_layer[l]["success"], -l))
    say("identification of new subjects' renderings")
    ident = identification(vlm, world_dir, layer=best)
    result = {
        "questions": len(sample),
        "questions_correct": len(correct),
        "questions_total": len(prompts),
        "constraint_knockout_drop": _relative_drop(c_clean, c_ko),
        "last_knockout_drop": _relative_drop(l_clean, l_ko),
        "mean_p_clean": sum(c_clean) / len(c_clean),
        "cases": len(requests),
        "constraint_edit_success": by_layer[best]["success"],
        "constraint_edit_layer": best,
        "edit_by_layer": {str(l): v for l, v in by_layer.items()},
        **ident,
        "targets": TARGETS,
        "seconds": round(time.time() - t0, 1),
    }
    result["passed"] = (
        result["constraint_knockout_drop"] >= TARGETS["constraint_knockout_drop"]
        and result["constraint_edit_success"] >= TARGETS["constraint_edit_success"]
    )
    return result
