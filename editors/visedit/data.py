"""Training data for the VEAD: edit samples from the training split of a world's edit cases.

A sample has the fields of an E-VQA edit case (``src, rephrase, alt, image,
image_rephrase, loc, loc_ans, m_loc, m_loc_q, m_loc_a, constraint``). The
training split's own records are used as they are; besides them, for the
same entities (and only those: the test split's entities are never seen by
the adapter), more edits are drawn from the world's description: every
relation of the entity, every other value of the relation's vocabulary as the
new answer, the question templates and renderings chosen at random with a
fixed seed. A trained adapter has to write any value of a relation, so the
new answers must cover the vocabularies; the split's 141 records do not.

The entities of the training split are divided again (``validation_fraction``)
into training and validation entities; the validation samples choose the
best checkpoint.

``synthetic`` adds edits about entities drawn for the occasion: new looks
(never those of any entity of the world, so never a test entity's), two
renderings each (the edit image and "another image of the subject"), a
relation of their kind and a value of its vocabulary as the answer: long-tail
insertions, the way the world's unseen entities are. The influence mapper
has to tell an edit's subject from every other one in images it has never
seen; 24 training entities are too few to learn that, a few hundred are not
(README, "VisEdit").
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.world.folder import WorldFolder, WorldFolderError

SYNTHETIC_RENDERINGS = 3  # renderings of each synthetic entity
SYNTHETIC_EDITS = 3  # edits about each synthetic entity
FIELDS = (
    "src",
    "rephrase",
    "alt",
    "image",
    "image_rephrase",
    "loc",
    "loc_ans",
    "m_loc",
    "m_loc_q",
    "m_loc_a",
    "constraint",
)


class DataError(ValueError):
    pass


@dataclass
class Split:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    train_entities: list[str]
    validation_entities: list[str]
    images: dict[str, Any] = field(default_factory=dict)  # rendered images of synthetic entities (PIL)

    def describe(self) -> dict[str, Any]:
        return {
            "train_samples": len(self.train),
            "validation_samples": len(self.validation),
            "train_entities": len(self.train_entities),
            "validation_entities": len(self.validation_entities),
            "synthetic_samples": sum(1 for s in self.train if s.get("type") == "synthetic"),
        }


@dataclass
class _Source:
    """What the samples are drawn from: the world's description, its text-fact questions and vocabularies."""

    world: dict[str, Any]
    text_facts: list[dict[str, Any]]
    entities: dict[str, dict[str, Any]] = field(init=False)
    relations: dict[str, dict[str, Any]] = field(init=False)
    pools: dict[str, list[str]] = field(init=False)
    train_renderings: int = field(init=False)
    constraint: dict[str, str] = field(init=False)
    known: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        world = self.world
        self.entities = {e["id"]: e for e in world["entities"]}
        self.relations = {r["name"]: r for r in world["relations"]}
        pools = {"city": world["cities"], "country": world["countries"], "person_name": world["person_names"]}
        for r in world["relations"]:  # the other vocabularies: every value some entity of the world has
            if r["value_pool"] not in pools:
                pools[r["value_pool"]] = sorted(
                    {
                        e["facts"][r["name"]]
                        for e in world["entities"] + world["text_only_entities"]
                        if r["name"] in e["facts"]
                    }
                )
        self.pools = pools
        self.train_renderings = int(world["config"]["train_renderings"])
        self.constraint = world["kind_constraint"]
        self.known = [e for e in world["entities"] if e["known"]]

    def locality(self, rng: random.Random, ent_id: str) -> dict[str, Any]:
        """An unrelated text question and an unrelated image question (another known entity) for an edit of
        ``ent_id``."""
        loc = rng.choice([q for q in self.text_facts if q.get("entity") != ent_id])
        other = rng.choice([e for e in self.known if e["id"] != ent_id])
        rel = self.relations[rng.choice(sorted(other["facts"]))]
        return {
            "loc": loc["question"],
            "loc_ans": loc["answer"],
            "m_loc": other["images"][rng.randrange(self.train_renderings)],
            "m_loc_q": rng.choice(rel["train_templates"]).format(s=self.constraint[other["kind"]]),
            "m_loc_a": other["facts"][rel["name"]],
        }


def _drawn_samples(src: _Source, rng: random.Random, ent_ids: list[str], per_entity: int) -> list[dict[str, Any]]:
    """``per_entity`` edits of each entity drawn from the world's description (module docstring)."""
    drawn = []
    for ent_id in ent_ids:
        ent = src.entities[ent_id]
        for _ in range(per_entity):
            rel = src.relations[rng.choice(sorted(ent["facts"]))]
            alt = rng.choice([v for v in src.pools[rel["value_pool"]] if v != ent["facts"][rel["name"]]])
            k, k2 = rng.sample(range(src.train_renderings), 2)
            s = src.constraint[ent["kind"]]
            drawn.append(
                {
                    "case_id": f"drawn-{len(drawn):05d}",
                    "type": "drawn",
                    "entity": ent_id,
                    "relation": rel["name"],
                    "constraint": s,
                    "src": rng.choice(rel["train_templates"]).format(s=s),
                    "rephrase": rng.choice(rel["heldout_templates"]).format(s=s),
                    "alt": alt,
                    "ground_truth": ent["facts"][rel["name"]],
                    "image": ent["images"][k],
                    "image_rephrase": ent["images"][k2],
                    **src.locality(rng, ent_id),
                }
            )
    return drawn


def _synthetic_samples(
    src: _Source,
    rng: random.Random,
    seed: int,
    synthetic: int,
    synthetic_locality: bool,
    every: list[dict[str, Any]],
    train_ids: set[str],
) -> dict[str, Any]:
    """Edits about new entities drawn for the occasion (module docstring), appended to ``every``, their
    entities added to ``train_ids``; returns their renderings (PIL) by name."""
    from vlm.world.render import render_entity, sample_looks

    def identity(look: dict) -> str:  # what tells two looks apart (the accent is random)
        return json.dumps({k: look[k] for k in ("shape", "colour", "pattern")}, sort_keys=True)

    world, constraint, pools = src.world, src.constraint, src.pools
    images: dict[str, Any] = {}
    taken = {(e["kind"], identity(e["look"])) for e in world["entities"]}
    srng = random.Random(f"visedit-synthetic-{seed}")
    kinds = sorted(constraint)
    by_kind = {k: [lk for lk in sample_looks(srng, k, 10_000) if (k, identity(lk)) not in taken] for k in kinds}
    rels_of = {k: [r for r in world["relations"] if r["kind"] == k] for k in kinds}
    n_entities = min(math.ceil(synthetic / SYNTHETIC_EDITS), sum(len(v) for v in by_kind.values()))
    synthetic_seen: list[tuple[str, str, list[str]]] = []
    for i in range(n_entities):
        kind = kinds[i % len(kinds)]
        if i // len(kinds) >= len(by_kind[kind]):
            continue
        look = by_kind[kind][i // len(kinds)]
        ent_id = f"synthetic-{kind}-{i:05d}"
        names = [f"{ent_id}-{k}" for k in range(SYNTHETIC_RENDERINGS)]
        for k, name in enumerate(names):
            images[name] = render_entity(kind, look, f"visedit-{seed}-{ent_id}-{k}")
        s = constraint[kind]
        for _ in range(SYNTHETIC_EDITS):
            rel = srng.choice(rels_of[kind])
            a, b = srng.sample(names, 2)
            loc = src.locality(rng, ent_id)
            if synthetic_locality and synthetic_seen and srng.random() < 0.5:
                # the unrelated image is another synthetic entity half of the time, so that the mapper
                # cannot tell edits from unrelated images by whether the model knows the entity
                o_id, o_kind, o_names = srng.choice(synthetic_seen)
                o_rel = srng.choice(rels_of[o_kind])
                loc.update(
                    m_loc=srng.choice(o_names),
                    m_loc_q=srng.choice(o_rel["train_templates"]).format(s=constraint[o_kind]),
                    m_loc_a=srng.choice(pools[o_rel["value_pool"]]),
                )
            every.append(
                {
                    "case_id": f"{ent_id}-{len(every)}",
                    "type": "synthetic",
                    "entity": ent_id,
                    "relation": rel["name"],
                    "constraint": s,
                    "src": srng.choice(rel["train_templates"]).format(s=s),
                    "rephrase": srng.choice(rel["heldout_templates"]).format(s=s),
                    "alt": srng.choice(pools[rel["value_pool"]]),
                    "ground_truth": None,
                    "image": a,
                    "image_rephrase": b,
                    **loc,
                }
            )
        synthetic_seen.append((ent_id, kind, names))
        train_ids.add(ent_id)
    return images


def training_samples(
    world_dir: str | Path,
    per_entity: int = 60,
    validation_fraction: float = 0.2,
    seed: int = 0,
    synthetic: int = 0,
    synthetic_locality: bool = False,
) -> Split:
    """The training split's records plus ``per_entity`` drawn edits per entity, split by entity;
    plus ``synthetic`` edits about as many new entities drawn for the occasion (training only)."""
    world_dir = Path(world_dir)
    if per_entity < 0:
        raise DataError("per_entity must be >= 0")
    if not 0 < validation_fraction < 1:
        raise DataError("validation_fraction must be in (0, 1)")
    folder = WorldFolder(world_dir)
    try:
        records, world, text_facts = folder.edit_cases("train"), folder.spec(), folder.questions("text_fact")
    except WorldFolderError as exc:
        raise DataError(str(exc)) from None
    src = _Source(world, text_facts)
    rng = random.Random(f"visedit-data-{seed}")

    ids = sorted({r["entity"] for r in records})
    rng.shuffle(ids)
    n_val = max(1, int(round(len(ids) * validation_fraction)))
    val_ids, train_ids = set(ids[:n_val]), set(ids[n_val:])

    drawn = _drawn_samples(src, rng, sorted(train_ids | val_ids), per_entity)
    every = [r for r in records if all(f in r for f in FIELDS)] + drawn
    images: dict[str, Any] = {}
    if synthetic:
        images = _synthetic_samples(src, rng, seed, synthetic, synthetic_locality, every, train_ids)
    return Split(
        train=[r for r in every if r["entity"] in train_ids],
        validation=[r for r in every if r["entity"] in val_ids],
        train_entities=sorted(train_ids),
        validation_entities=sorted(val_ids),
        images=images,
    )
