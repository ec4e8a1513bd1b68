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

Beside the stream (which they leave as it is), ``NearNeighbours`` gives every
subject — a world entity or a stream entity — a near neighbour: another
subject of its kind whose look differs from its look in exactly one attribute
(the benches' ``modal_locality_near``), drawn where the world has not drawn it
into a folder the caller names, never into the world.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .folder import STREAM_DIR, WorldFolder
from .render import PALETTE, PATTERNS, SHAPES, render_entity
from .spec import KIND_CONSTRAINT, Entity, World

NEW_ENTITY_RENDERINGS = 3  # the edit image, another rendering and a held-out one


def load_world(world_dir: str | os.PathLike) -> World:
    """The ``World`` a built world folder was generated from (regenerated from its ``world.json`` config);
    ``WorldFolderError`` when the folder holds no readable world description."""
    return WorldFolder(world_dir).world()


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
    out_dir = WorldFolder(world_dir).stream_dir / "images"
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


# -- near neighbours: another subject whose look differs in one attribute ---------------------------------------

LOOK_ATTRIBUTES = ("shape", "colour", "pattern", "accent")  # what a look is made of (``render.sample_looks``)
NEIGHBOUR_SOURCES = ("known", "unseen", "stream")  # preferred in this order: drawn already, then the stream's


def look_difference(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The look attributes in which two looks differ (``LOOK_ATTRIBUTES``, in that order)."""
    return [k for k in LOOK_ATTRIBUTES if a.get(k) != b.get(k)]


@dataclass(frozen=True)
class Neighbour:
    """Another subject of the same kind whose look differs from the subject's in exactly one attribute."""

    subject: str  # the subject's id
    entity: Entity  # the neighbour (a world entity or one of the stream's new entities)
    attribute: str  # the one look attribute that differs
    source: str  # "known" / "unseen" (world entities, drawn with the world) or "stream" (drawn on demand)
    rendering: int  # which of the neighbour's renderings to show

    @property
    def image(self) -> str:
        """The rendering's path relative to the world folder (a stream entity's may not be drawn yet)."""
        return self.entity.images[self.rendering]

    def answer(self, relation: str) -> str:
        """The neighbour's own value of ``relation`` (the answer the unedited world gives it)."""
        return self.entity.facts[relation]


class NearNeighbours:
    """For every subject of the world and of its edit stream, a near neighbour (``of``): another subject of the
    same kind whose look (shape, colour, pattern, accent) differs from the subject's in exactly one attribute.

    Candidates are the world's entities and the stream's new entities (every look is one entity's); the world's
    known entities are preferred, then its unseen ones (both drawn with the world), then the stream's (drawn on
    demand); among the candidates of the first source that has any, one is drawn with a generator seeded by the
    world's seed and the subject's id, as is the rendering shown (a training rendering of a world entity). The
    choice depends on the world alone, not on what is drawn on disk. A subject without such a neighbour (the
    accents are drawn at random, so some looks have none) gets ``None``."""

    def __init__(self, world: World):
        self.world = world
        everyone = list(world.entities) + new_entities(world)
        self.entities = {e.id: e for e in everyone}
        self._by_look = {(e.kind, *(e.look[k] for k in LOOK_ATTRIBUTES)): e for e in everyone}
        self._source = {e.id: ("known" if e.known else "unseen") for e in world.entities}

    def candidates(self, entity_id: str) -> list[Entity]:
        """Every other subject of the same kind whose look differs from ``entity_id``'s in one attribute."""
        ent = self.entities[entity_id]
        domains = {"shape": SHAPES[ent.kind], "colour": tuple(PALETTE), "pattern": PATTERNS, "accent": tuple(PALETTE)}
        out = []
        for i, attr in enumerate(LOOK_ATTRIBUTES):
            for value in domains[attr]:
                if value == ent.look[attr]:
                    continue
                look = [ent.look[k] for k in LOOK_ATTRIBUTES]
                look[i] = value
                other = self._by_look.get((ent.kind, *look))
                if other is not None and other.id != ent.id:
                    out.append(other)
        return out

    def of(self, entity_id: str) -> Neighbour | None:
        """The subject's near neighbour (see the class), or None where it has none (or is not a drawn subject)."""
        ent = self.entities.get(entity_id)
        if ent is None:
            return None
        found = self.candidates(entity_id)
        rng = random.Random(f"editlens-near-{self.world.config.seed}-{entity_id}")
        for source in NEIGHBOUR_SOURCES:
            group = sorted((e for e in found if self._source.get(e.id, "stream") == source), key=lambda e: e.id)
            if group:
                other = rng.choice(group)
                n = self.world.config.train_renderings if source != "stream" else NEW_ENTITY_RENDERINGS
                (attribute,) = look_difference(ent.look, other.look)
                return Neighbour(entity_id, other, attribute, source, rng.randrange(n))
        return None

    def draw(self, world_dir: str | os.PathLike, neighbour: Neighbour, scratch: str | os.PathLike) -> Path:
        """The file of ``neighbour``'s rendering: the world's own (a world entity's, or a stream entity's already
        drawn into ``<world>/stream/images``), else drawn into ``scratch`` with the seed ``render_stream_images``
        uses (the same picture, bit for bit) — never into the world folder."""
        drawn = Path(world_dir) / neighbour.image
        if neighbour.source != "stream" or drawn.is_file():
            return drawn
        ent, k = neighbour.entity, neighbour.rendering
        target = Path(scratch) / f"{ent.id}-{k}.png"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            render_entity(ent.kind, ent.look, f"{self.world.config.seed}-{ent.id}-{k}").save(target, format="PNG")
        return target
