"""Calibrating a trained adapter's scope gate on a world (``editlens visedit calibrate``).

* reference keys: the training renderings of the world's known entities — the
  images the model has learned its subjects from — labelled by entity;
* calibration pairs: renderings drawn for the occasion (seeds no other part of
  EditLens uses, so never an image that an edit, a metric or a reference
  uses) of every world entity and of new looks no world entity has; a pair of
  renderings of one look is a same-subject pair, of two looks an unrelated one;
* reference questions: every distinct visual question the model was trained
  on (``questions/train.json``), labelled with its relation;
* τ: the cosine above which at most ``far`` of the unrelated pairs fall
  (``scope.calibrate``), stored with the adapter together with the recall it
  leaves and the recall at other false-accept rates.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlm.images import ProcessedImage, process_image
from vlm.loading import VLM
from vlm.patching import run_patched
from vlm.prompts import collate, encode

from .adapter import VEAD
from .editor import signal_state
from .scope import QuestionReader, Scope, calibrate, image_keys

CALIBRATION_RENDERINGS = 3  # fresh renderings per look
CALIBRATION_LOOKS = 360  # looks (world entities first, then new looks) the pairs are drawn from


def visual_states(vlm: VLM, layer: int, pixel_values: Sequence[ProcessedImage], batch_size: int = 128) -> torch.Tensor:
    """(n, N_v, d) visual states at the input of decoder ``layer`` for each image (a neutral question); the
    images must give one token count (``visual_state_list`` takes any)."""
    out = visual_state_list(vlm, layer, pixel_values, batch_size)
    if len({s.shape[0] for s in out}) > 1:
        raise ValueError("these images give different numbers of image tokens: use visual_state_list")
    return torch.stack(out)


@torch.no_grad()
def visual_state_list(
    vlm: VLM, layer: int, pixel_values: Sequence[ProcessedImage], batch_size: int = 128
) -> list[torch.Tensor]:
    """Each image's (N_v, d) visual states at the input of decoder ``layer`` (a neutral question); N_v follows
    the image where the family sizes images dynamically."""
    out = []
    for start in range(0, len(pixel_values), batch_size):
        prompts = [
            encode(vlm.processor, "what is this ?", pixel_values=p) for p in pixel_values[start : start + batch_size]
        ]
        key = signal_state(layer)
        run = run_patched(
            vlm, collate(prompts, vlm.tokenizer.pad_token_id), capture={key}, stop_after_layer=max(layer - 1, 0)
        )
        states = run.captured[key].float().cpu()
        out += [states[i, p.image_positions] for i, p in enumerate(prompts)]
    return out


def keys_of_images(vlm: VLM, vead: VEAD, images: Sequence[Any]) -> torch.Tensor:
    """Unit image keys (n, k) of PIL images (or pixel tensors)."""
    pix = [im if isinstance(im, torch.Tensor) else process_image(vlm.processor, im) for im in images]
    vead = vead.to(vlm.input_device)
    states = visual_state_list(vlm, vead.config.layer, pix)
    return torch.stack([image_keys(vead, s.to(vlm.input_device)) for s in states]).cpu()


def calibrate_world_scope(
    vlm: VLM, vead: VEAD, world_dir: str | Path, far: float = 1e-3, looks: int = CALIBRATION_LOOKS, seed: int = 0
) -> Scope:
    """The scope gate of ``vead`` on a built world (module docstring)."""
    from vlm.images import load_image
    from vlm.world.folder import WorldFolder
    from vlm.world.render import render_entity
    from vlm.world.stream import new_entities

    t0 = time.perf_counter()
    world = WorldFolder(world_dir)
    spec = world.spec()
    n_train = int(spec["config"]["train_renderings"])
    known = [e for e in spec["entities"] if e["known"]]
    ref_paths = [(e["id"], p) for e in known for p in e["images"][:n_train]]
    reference = keys_of_images(vlm, vead, [load_image(world.image(p)) for _, p in ref_paths])
    pool = [(e["kind"], e["look"]) for e in spec["entities"]]
    pool += [(e.kind, e.look) for e in new_entities(world.world())]
    rng = random.Random(f"visedit-scope-{seed}")
    chosen = pool[: len(spec["entities"])] + rng.sample(
        pool[len(spec["entities"]) :], max(0, looks - len(spec["entities"]))
    )
    images, owner = [], []
    for i, (kind, look) in enumerate(chosen):
        for r in range(CALIBRATION_RENDERINGS):
            images.append(render_entity(kind, look, f"scope-calibration-{seed}-{i}-{r}"))
            owner.append(i)
    keys = keys_of_images(vlm, vead, images)
    own = torch.tensor(owner)
    cos = keys @ keys.T
    same = own[:, None] == own[None, :]
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    tau, report = calibrate(cos[same & upper], cos[~same & upper], far)
    report.update(
        looks=len(chosen),
        renderings_per_look=CALIBRATION_RENDERINGS,
        reference_images=len(ref_paths),
        seconds=round(time.perf_counter() - t0, 1),
    )
    questions, labels = world_questions(vlm, world)
    report["reference_questions"] = len(labels)
    return Scope(tau, reference, [s for s, _ in ref_paths], far, report, questions, labels)


def world_questions(vlm: VLM, world_dir: str | Path) -> tuple[torch.Tensor, list[str]]:
    """Keys (Q, d) of the distinct visual questions of a world's training set, and their relations."""
    from PIL import Image

    from vlm.world.folder import WorldFolder

    items = WorldFolder(world_dir).questions("train")
    asked = {q["question"]: q["relation"] for q in items if q.get("image") and q.get("relation")}
    if not asked:
        return torch.zeros(0, 0), []
    reader = QuestionReader(vlm)
    pix = process_image(vlm.processor, Image.new("RGB", (64, 64)))
    prompts = [encode(vlm.processor, q, pixel_values=pix) for q in asked]
    keys = torch.cat([reader.keys(p.input_ids.unsqueeze(0), [p.image_span[1]]) for p in prompts])
    return keys, list(asked.values())
