"""The edit stream: a long, deterministic sequence of distinct edit facts for lifelong editing.

``bench editing`` draws from the world's few hundred edit cases; lifelong
editing needs more than a thousand distinct (entity, relation) facts, edited
one after another. The stream is made from the world alone, without touching
its model:

1. a counterfactual of every known fact (36 entities × 3 relations in the
   default world: 108 facts; the new value drawn from the relation's pool);
2. an insertion of every fact of the world's unseen entities (72);
3. insertions about **new entities**: every (shape, colour, pattern) look of a
   kind that no world entity uses (240 looks per kind, 20 used: 660 new
   entities, 1,980 facts), each fact's value drawn from its relation's pool.
   Their images are rendered on demand into ``<world>/stream/images/`` (the
   model never saw them, like the world's own unseen entities).

The default world gives 2,160 facts; the facts are shuffled with the world's
seed, so any prefix is a deterministic mix of the three kinds. Each record
has the E-VQA shape of the world's edit cases (``src`` a training template,
``rephrase`` a held-out one, ``image_rephrase`` another rendering,
``image_heldout`` a rendering never used in training, text and modal
locality probes about other entities; ``m_loc_entity`` and
``m_loc_relation`` say which fact the modal-locality probe asks), plus
``type`` (counterfactual / insertion / new_entity) and ``stream_index``.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from .render import PALETTE, PATTERNS, SHAPES, render_entity
from .spec import KIND_CONSTRAINT, Entity, World, WorldConfig

NEW_ENTITY_RENDERINGS = 3  # the edit image, another rendering and a held-out one
STREAM_DIR = "stream"


def load_world(world_dir: str | os.PathLike) -> World:
    """The ``World`` a built world folder was generated from (regenerated from its ``world.json`` config)."""
    path = Path(world_dir) / "world.json"
    try:
        cfg = json.loads(path.read_text())["config"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise FileNotFoundError(
            f"{path} is not a built world's description ({exc}); run `editlens world build`"
        ) from None
    return World(WorldConfig(**cfg))


def new_entities(world: World) -> list[Entity]:
    """Entities with every look no world entity has (by shape, colour and pattern), in a seeded order."""
    rng = random.Random(f"editlens-stream-entities-{world.config.seed}")
    used = {(e.kind, e.look["shape"], e.look["colour"], e.look["pattern"]) for e in world.entities}
    out: list[Entity] = []
    for kind in KIND_CONSTRAINT:
        combos = [(s, c, p) for s in SHAPES[kind] for c in PALETTE for p in PATTERNS if (kind, s, c, p) not in used]
        rng.shuffle(combos)
        for i, (shape, colour, pattern) in enumerate(combos):
            accent = rng.choice([c for c in PALETTE if c != colour])
            facts = {r.name: rng.choice(world.value_pools[r.value_pool]) for r in world.relations_of(kind)}
            ent = Entity(
                id=f"{kind}-new-{i:03d}",
                kind=kind,
                name="",
                known=False,
                facts=facts,
                look={"shape": shape, "colour": colour, "accent": accent, "pattern": pattern},
            )
            ent.images = [f"{STREAM_DIR}/images/{ent.id}-{k}.png" for k in range(NEW_ENTITY_RENDERINGS)]
            out.append(ent)
    return out


def edit_stream(world: World, n: int | None = None) -> list[dict[str, Any]]:
    """The first ``n`` facts of the world's edit stream (all of them: ``n=None``); see the module docstring."""
    cfg = world.config
    rng = random.Random(f"editlens-stream-{cfg.seed}")
    text_locality = world.text_fact_questions()
    known = world.known
    facts: list[tuple[str, Entity, Any, str]] = []
    for ent in known:
        for rel in world.relations_of(ent.kind):
            pool = [v for v in world.value_pools[rel.value_pool] if v != ent.facts[rel.name]]
            facts.append(("counterfactual", ent, rel, rng.choice(pool)))
    for ent in world.unseen:
        for rel in world.relations_of(ent.kind):
            facts.append(("insertion", ent, rel, ent.facts[rel.name]))
    for ent in new_entities(world):
        for rel in world.relations_of(ent.kind):
            facts.append(("new_entity", ent, rel, ent.facts[rel.name]))
    rng.shuffle(facts)
    if n is not None:
        if n < 1:
            raise ValueError("the stream has at least one edit: n must be >= 1")
        if n > len(facts):
            raise ValueError(f"this world's edit stream has {len(facts)} distinct facts; {n} were asked for")
        facts = facts[:n]
    records = []
    for i, (kind, ent, rel, alt) in enumerate(facts):
        constraint = KIND_CONSTRAINT[ent.kind]
        if kind == "new_entity":
            image, image_rephrase, image_heldout = ent.images
        else:
            k = rng.randrange(cfg.train_renderings)
            k_other = (k + 1 + rng.randrange(cfg.train_renderings - 1)) % cfg.train_renderings
            image, image_rephrase = ent.images[k], ent.images[k_other]
            image_heldout = ent.images[rng.randrange(cfg.train_renderings, cfg.renderings)]
        loc = rng.choice([q for q in text_locality if q.entity != ent.id])
        other = rng.choice([e for e in known if e.id != ent.id])
        orel = rng.choice(world.relations_of(other.kind))
        mq = world.visual_qa(other, orel, rng.choice(orel.train_templates), rng.randrange(cfg.train_renderings))
        records.append(
            {
                "case_id": f"stream-{i:04d}",
                "stream_index": i,
                "type": kind,
                "entity": ent.id,
                "entity_name": ent.name,
                "relation": rel.name,
                "constraint": constraint,
                "src": rng.choice(rel.train_templates).format(s=constraint),
                "rephrase": rng.choice(rel.heldout_templates).format(s=constraint),
                "alt": alt,
                "ground_truth": ent.facts[rel.name],
                "pred": None,
                "image": image,
                "image_rephrase": image_rephrase,
                "image_heldout": image_heldout,
                "loc": loc.question,
                "loc_ans": loc.answer,
                "m_loc": mq.image,
                "m_loc_q": mq.question,
                "m_loc_a": mq.answer,
                "m_loc_entity": mq.entity,
                "m_loc_relation": mq.relation,
            }
        )
    return records


def render_stream_images(world_dir: str | os.PathLike, records: list[dict[str, Any]]) -> int:
    """Draw the images of the records' new entities into ``<world>/stream/images`` (those not drawn yet);
    returns how many were drawn. Each file is written to a temporary name and renamed into place."""
    world_dir = Path(world_dir)
    world = load_world(world_dir)
    by_id = {e.id: e for e in new_entities(world)}
    out_dir = world_dir / STREAM_DIR / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = 0
    for rec in records:
        ent = by_id.get(rec["entity"])
        if ent is None:
            continue
        for k, rel_path in enumerate(ent.images):
            target = world_dir / rel_path
            if target.is_file():
                continue
            img = render_entity(ent.kind, ent.look, f"{world.config.seed}-{ent.id}-{k}")
            fd, tmp = tempfile.mkstemp(suffix=".png", dir=out_dir)
            os.close(fd)
            img.save(tmp, format="PNG")
            os.replace(tmp, target)
            drawn += 1
    return drawn
