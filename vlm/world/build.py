"""``editlens world build``: generate the world, train its model, evaluate, cache.

Output folder layout::

    <out>/model/               save_pretrained folder (config, safetensors, tokenizer,
                               processor, chat template) — loads with plain transformers
    <out>/images/*.png         every rendering of every entity
    <out>/world.json           entities, facts, relations, templates, config
    <out>/questions/*.json     evaluation question sets (image paths relative to <out>)
    <out>/edit_cases/train.json, test.json   E-VQA-shaped edit cases
    <out>/summary.json         accuracies, timings, loss curve, build key

The build is deterministic per seed (same world, same weights on the same
machine and thread count) and cached: a second call with the same seed and
recipe returns the stored summary at once. It writes into a temporary
sibling folder and renames it into place, so an interrupted build never
leaves a half-written world behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..images import ProcessedImage, process_image
from ..loading import load_vlm
from ..prompts import encode
from ..scoring import generate, score_answers
from .folder import WorldFolder, default_world_dir
from .render import PALETTE, PATTERNS, SHAPES, render_entity
from .spec import QA, World, WorldConfig
from .tokenizer import build_processor
from .train import (
    Example,
    ModelConfig,
    TrainConfig,
    config_dict,
    encode_items,
    make_model,
    pretrain_vision,
    train_model,
)

VISION_PRETRAIN_RENDERINGS = 16  # extra renderings per entity, used only to pretrain the vision tower

# Bump when anything that changes the built world or model changes.
RECIPE_VERSION = "5"  # 5: deterministic training (vlm.reproducible)

StageFn = Callable[[str], None]
ProgressFn = Callable[[int, int, float], None]


def build_key(world_cfg: WorldConfig, model_cfg: ModelConfig, train_cfg: TrainConfig) -> str:
    """A digest of everything that shapes the built world and model; a cached build is reused only if it matches."""
    blob = json.dumps(
        {"recipe": RECIPE_VERSION, "world": world_cfg.to_dict(), **config_dict(model_cfg, train_cfg)}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_summary(out: Path) -> dict[str, Any] | None:
    """The summary of a complete build in ``out``, or None."""
    return WorldFolder(out).built_summary()


def _accuracy(vlm, processor, items: list[QA], pixel_cache) -> float:
    prompts = encode_items(processor, items, pixel_cache)
    scores = score_answers(vlm, prompts, batch_size=64)
    return sum(s.exact for s in scores) / len(scores)


def _image_swap_change_rate(vlm, world: World, pixel_cache, rng: random.Random) -> float:
    """Share of visual questions whose greedy answer changes when the image shows
    another entity of the same kind (one whose true answer differs)."""
    originals, swapped = [], []
    for ent in world.known:
        for rel in world.relations_of(ent.kind):
            others = [e for e in world.known if e.kind == ent.kind and e.facts[rel.name] != ent.facts[rel.name]]
            other = rng.choice(others)
            q = world.visual_qa(ent, rel, rel.train_templates[0], 0)
            originals.append(encode(vlm.processor, q.question, pixel_values=pixel_cache[q.image]))
            swapped.append(encode(vlm.processor, q.question, pixel_values=pixel_cache[other.images[0]]))
    a = generate(vlm, originals, max_new_tokens=4, batch_size=64)
    b = generate(vlm, swapped, max_new_tokens=4, batch_size=64)
    return sum(x != y for x, y in zip(a, b)) / len(a)


def _vision_pretrain_data(world: World, processor, seed: int) -> tuple[list[ProcessedImage], dict[str, torch.Tensor]]:
    """Renderings (not the evaluation ones) of every entity with their visual attributes."""
    kinds = sorted(SHAPES)
    shapes = [f"{k}:{s}" for k in kinds for s in SHAPES[k]]
    colours = sorted(PALETTE)
    imgs, lab = [], {"kind": [], "shape": [], "colour": [], "accent": [], "pattern": []}
    for ent in world.entities:
        for k in range(VISION_PRETRAIN_RENDERINGS):
            imgs.append(render_entity(ent.kind, ent.look, f"{seed}-{ent.id}-pretrain-{k}"))
            lab["kind"].append(kinds.index(ent.kind))
            lab["shape"].append(shapes.index(f"{ent.kind}:{ent.look['shape']}"))
            lab["colour"].append(colours.index(ent.look["colour"]))
            lab["accent"].append(colours.index(ent.look["accent"]))
            lab["pattern"].append(PATTERNS.index(ent.look["pattern"]))
    return [process_image(processor, im) for im in imgs], {k: torch.tensor(v) for k, v in lab.items()}


def _draw_images(world: World, processor, seed: int, tmp: Path) -> dict[str, ProcessedImage]:
    """Every rendering of every entity, saved under ``tmp`` and processed for the model, by its path."""
    pixel_cache: dict[str, ProcessedImage] = {}
    for ent in world.entities:
        for k, rel_path in enumerate(ent.images):
            img = render_entity(ent.kind, ent.look, f"{seed}-{ent.id}-{k}")
            img.save(tmp / rel_path)
            pixel_cache[rel_path] = process_image(processor, img)
    return pixel_cache


def _special_tokens(processor) -> dict[str, int]:
    tok = processor.tokenizer
    return {
        "pad": tok.pad_token_id,
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "image": processor.image_token_id,
    }


def _training_examples(world: World, processor, train_items: list[QA], pixel_cache) -> list[Example]:
    """The training questions encoded, each with its entity and the first tokens of the entity's facts."""
    tok = processor.tokenizer
    by_id = {e.id: e for e in world.entities + world.text_only}

    def attributes(entity_id):
        facts = by_id[entity_id].facts.values() if entity_id else ()
        return [tok.convert_tokens_to_ids(v.split()[0]) for v in facts]

    return [
        Example(p, tok.eos_token_id, it.entity, attributes(it.entity))
        for p, it in zip(encode_items(processor, train_items, pixel_cache), train_items)
    ]


def _train(
    tmp: Path,
    world: World,
    processor,
    special: dict[str, int],
    examples: list[Example],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    seed: int,
    say: StageFn,
    progress: ProgressFn | None,
) -> tuple[list, list, float]:
    """Make the model, pretrain its vision tower, train it, save it with the processor into ``tmp/model``;
    returns the loss curve, the vision pretraining curve and the training seconds."""
    tok = processor.tokenizer
    t_train = time.time()
    model = make_model(len(tok), special, model_cfg, seed)
    vision_curve = []
    if train_cfg.vision_pretrain_steps:
        say(f"pretraining the vision tower ({train_cfg.vision_pretrain_steps} steps)")
        pixels, labels = _vision_pretrain_data(world, processor, seed)
        vision_curve = pretrain_vision(model, pixels, labels, train_cfg, seed, progress)
    say(f"training the model ({train_cfg.steps} steps on {len(examples)} examples)")
    curve = train_model(model, examples, tok.pad_token_id, train_cfg, seed, progress)
    train_seconds = time.time() - t_train
    model.save_pretrained(tmp / "model")
    processor.save_pretrained(tmp / "model")
    del model
    return curve, vision_curve, train_seconds


def _question_sets(world: World, train_items: list[QA]) -> dict[str, list[QA]]:
    return {
        "train": train_items,
        "heldout_paraphrase": world.heldout_paraphrase_questions(),
        "heldout_image": world.heldout_image_questions(),
        "text_fact": world.text_fact_questions(),
        "multi_constraint": world.multi_constraint_questions(),
    }


def _write_cases_and_questions(tmp: Path, world: World, processor, vlm, pixel_cache, sets) -> dict[str, list]:
    """The edit cases (each with the trained model's answer), the question sets and world.json, into ``tmp``."""
    cases = world.edit_cases()
    for split in cases.values():
        prompts = [encode(processor, c["src"], pixel_values=pixel_cache[c["image"]]) for c in split]
        for c, pred in zip(split, generate(vlm, prompts, max_new_tokens=4, batch_size=64)):
            c["pred"] = pred
    (tmp / "edit_cases").mkdir()
    for name, split in cases.items():
        (tmp / "edit_cases" / f"{name}.json").write_text(json.dumps(split, indent=1))
    (tmp / "questions").mkdir()
    for name, items in sets.items():
        (tmp / "questions" / f"{name}.json").write_text(json.dumps([q.to_dict() for q in items], indent=1))
    (tmp / "world.json").write_text(json.dumps(world.to_dict(), indent=1))
    return cases


def _summary(
    *,
    seed: int,
    key: str,
    world_cfg: WorldConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    acc: dict[str, float],
    swap: float,
    t0: float,
    train_seconds: float,
    world: World,
    tok,
    examples: list[Example],
    cases: dict[str, list],
    pixel_cache,
    vlm,
    curve: list,
    vision_curve: list,
) -> dict[str, Any]:
    """The build's summary.json (``t0``: when the build started)."""
    return {
        "seed": seed,
        "family": model_cfg.family,
        "build_key": key,
        "recipe_version": RECIPE_VERSION,
        "train_accuracy": acc["train"],
        "heldout_paraphrase_accuracy": acc["heldout_paraphrase"],
        "heldout_image_accuracy": acc["heldout_image"],
        "text_fact_accuracy": acc["text_fact"],
        "multi_constraint_accuracy": acc["multi_constraint"],
        "image_swap_change_rate": swap,
        "build_seconds": round(time.time() - t0, 1),
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "counts": {
            "entities_known": len(world.known),
            "entities_unseen": len(world.unseen),
            "training_examples": len(examples),
            "edit_cases_train": len(cases["train"]),
            "edit_cases_test": len(cases["test"]),
            "vocab_size": len(tok),
            "image_tokens": next(iter(pixel_cache.values())).num_tokens,
            "decoder_layers": model_cfg.num_layers,
        },
        "fingerprint": vlm.fingerprint,
        "config": {"world": world_cfg.to_dict(), **config_dict(model_cfg, train_cfg)},
        "loss_curve": curve,
        "vision_pretrain_curve": vision_curve,
    }


def build_world(
    seed: int = 0,
    out: str | os.PathLike | None = None,
    force: bool = False,
    world_cfg: WorldConfig | None = None,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    stage: StageFn | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Build (or return the cached) world for ``seed`` in ``model_cfg.family``; returns the summary dict."""
    world_cfg = world_cfg or WorldConfig(seed=seed)
    if world_cfg.seed != seed:
        raise ValueError("world_cfg.seed and seed disagree")
    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or TrainConfig()
    out = Path(out).expanduser().resolve() if out else default_world_dir(seed, model_cfg.family)
    key = build_key(world_cfg, model_cfg, train_cfg)
    cached = load_summary(out)
    if cached and cached.get("build_key") == key and not force:
        return {**cached, "cached": True, "path": str(out)}
    if out.exists() and not force and not cached:
        if any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a world folder; choose another --out")
    say = stage or (lambda s: None)
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        say("generating the world and drawing its images")
        world = World(world_cfg)
        (tmp / "images").mkdir()
        processor = build_processor(world.words(), model_cfg.patch_size, model_cfg.family)
        pixel_cache = _draw_images(world, processor, seed, tmp)

        say("encoding the training questions")
        tok = processor.tokenizer
        special = _special_tokens(processor)
        train_items = world.training_set()
        examples = _training_examples(world, processor, train_items, pixel_cache)
        curve, vision_curve, train_seconds = _train(
            tmp, world, processor, special, examples, model_cfg, train_cfg, seed, say, progress
        )

        say("evaluating")
        vlm = load_vlm(tmp / "model", device="cpu", dtype="float32")
        sets = _question_sets(world, train_items)
        acc = {name: _accuracy(vlm, processor, items, pixel_cache) for name, items in sets.items()}
        swap = _image_swap_change_rate(vlm, world, pixel_cache, random.Random(f"swap-{seed}"))

        say("writing edit cases")
        cases = _write_cases_and_questions(tmp, world, processor, vlm, pixel_cache, sets)
        summary = _summary(
            seed=seed,
            key=key,
            world_cfg=world_cfg,
            model_cfg=model_cfg,
            train_cfg=train_cfg,
            acc=acc,
            swap=swap,
            t0=t0,
            train_seconds=train_seconds,
            world=world,
            tok=tok,
            examples=examples,
            cases=cases,
            pixel_cache=pixel_cache,
            vlm=vlm,
            curve=curve,
            vision_curve=vision_curve,
        )
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        del vlm
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "cached": False, "path": str(out)}
