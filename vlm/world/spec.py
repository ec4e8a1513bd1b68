"""The synthetic factual-VQA world: entities, relations, questions, edit cases.

Everything here is plain data generated deterministically from a seed; images
are drawn by ``render.py`` and the model is trained by ``train.py``.

Vocabulary of the world
-----------------------
* Three entity kinds (landmark, person, brand), each shown in images by a
  kind-specific procedural drawing and named with a made-up word.
* Each kind has three relations whose values come from fixed vocabularies
  (cities, years, professions, product words, made-up person names, ...).
  Some values are two tokens long (architects and founders are "first last"),
  so answers exercise multi-token scoring.
* Every relation has question templates with a subject slot ``{s}``. The slot
  takes either the visual constraint ("this landmark") together with an image,
  or the entity's name without an image. Templates are split into training
  paraphrases and held-out paraphrases that the model never sees.
* Multi-constraint questions add a textual constraint (a true attribute of the
  entity) to the visual one.
* Text-only facts (which country a city is in) need no image at all and serve
  as text locality probes.
* Entities known from text only (asked about by name, never shown) make every
  value of every relation an attested answer, as a language model knows far
  more entities than it sees in images.
* Edit cases follow the E-VQA record shape (src, rephrase, alt, pred, image,
  image_rephrase, loc, loc_ans, m_loc, m_loc_q, m_loc_a) with train and test
  splits: counterfactual edits of known facts, and insertions of facts about
  entities whose images and names the model never saw (long-tail insertion).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

KIND_CONSTRAINT = {
    "landmark": "this landmark",
    "person": "this person",
    "brand": "this brand",
}

# Identity questions teach the model to name what it sees, the way caption
# pretraining does for LLaVA. They are training data, not evaluation data.
KIND_IDENTITY_TEMPLATES = {
    "landmark": ["what is the name of {s} ?", "which landmark is this ?"],
    "person": ["what is the name of {s} ?", "who is this person ?"],
    "brand": ["what is the name of {s} ?", "which brand is this ?"],
}


@dataclass(frozen=True)
class Relation:
    name: str
    kind: str
    value_pool: str
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "city",
        "landmark",
        "city",
        (
            "which city is {s} in ?",
            "in which city is {s} located ?",
            "{s} is in which city ?",
            "what city is {s} located in ?",
        ),
        ("in what city is {s} ?", "{s} is located in what city ?"),
    ),
    Relation(
        "year",
        "landmark",
        "year",
        (
            "in which year was {s} built ?",
            "when was {s} built ?",
            "what year was {s} built in ?",
            "{s} was built in which year ?",
        ),
        ("in what year was {s} built ?", "which year was {s} built in ?"),
    ),
    Relation(
        "architect",
        "landmark",
        "person_name",
        (
            "who designed {s} ?",
            "who is the architect of {s} ?",
            "which architect designed {s} ?",
            "{s} was designed by whom ?",
        ),
        ("who was {s} designed by ?", "which person designed {s} ?"),
    ),
    Relation(
        "profession",
        "person",
        "profession",
        (
            "what is the job of {s} ?",
            "what does {s} do for a living ?",
            "what is the profession of {s} ?",
            "{s} works as what ?",
        ),
        ("what job does {s} do ?", "what is {s} by profession ?"),
    ),
    Relation(
        "birthplace",
        "person",
        "city",
        (
            "where was {s} born ?",
            "in which city was {s} born ?",
            "what is the birthplace of {s} ?",
            "{s} was born in which city ?",
        ),
        ("in what city was {s} born ?", "which city is the birthplace of {s} ?"),
    ),
    Relation(
        "employer",
        "person",
        "brand_name",
        (
            "which company does {s} work for ?",
            "who employs {s} ?",
            "what company employs {s} ?",
            "{s} works for which company ?",
        ),
        ("for which company does {s} work ?", "which company employs {s} ?"),
    ),
    Relation(
        "founder",
        "brand",
        "person_name",
        ("who founded {s} ?", "who is the founder of {s} ?", "{s} was founded by whom ?", "which person founded {s} ?"),
        ("who was {s} founded by ?", "who was the founder of {s} ?"),
    ),
    Relation(
        "country",
        "brand",
        "country",
        (
            "which country is {s} from ?",
            "what country does {s} come from ?",
            "{s} is from which country ?",
            "in which country was {s} founded ?",
        ),
        ("from which country is {s} ?", "{s} comes from what country ?"),
    ),
    Relation(
        "product",
        "brand",
        "product",
        (
            "what does {s} make ?",
            "what product does {s} sell ?",
            "which product is {s} known for ?",
            "{s} makes what ?",
        ),
        ("what product is {s} known for ?", "what product does {s} make ?"),
    ),
)

# A second (textual) constraint that a multi-constraint question adds: a true
# attribute of the entity, phrased inside the question.
MULTI_CONSTRAINT = {
    # target relation: (template with {s} and {c}, relation providing {c}, phrase)
    "landmark": ("which city is {s} designed by {c} in ?", "city", "architect", "designed by {c}"),
    "person": ("what is the job of {s} born in {c} ?", "profession", "birthplace", "born in {c}"),
    "brand": ("what does {s} from {c} make ?", "product", "country", "from {c}"),
}

CITY_COUNTRY_TEMPLATES_TRAIN = ("which country is {c} in ?", "{c} is in which country ?")
CITY_COUNTRY_TEMPLATES_HELDOUT = ("in what country is {c} ?",)

PROFESSIONS = (
    "baker",
    "pilot",
    "painter",
    "sailor",
    "doctor",
    "farmer",
    "poet",
    "judge",
    "dancer",
    "tailor",
    "miner",
    "singer",
    "chemist",
    "lawyer",
    "weaver",
    "potter",
)
PRODUCTS = (
    "shoes",
    "tea",
    "cars",
    "phones",
    "clocks",
    "bread",
    "paint",
    "toys",
    "lamps",
    "soap",
    "bikes",
    "hats",
    "maps",
    "glass",
    "rope",
    "candles",
)
YEARS = tuple(str(y) for y in range(1702, 1990, 13))

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "tr",
    "st",
    "th",
    "qu",
    "sk",
    "pl",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "n", "r", "l", "k", "s", "th", "x", "m", "nd", "rk")


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world. The defaults are the embedded default world."""

    seed: int = 0
    known_per_kind: int = 12
    unseen_per_kind: int = 8
    text_only_per_kind: int = 24  # entities the language model knows only by name (see World.text_only)
    n_cities: int = 12
    n_countries: int = 6
    n_person_names: int = 24
    renderings: int = 8  # per entity
    train_renderings: int = 6  # the first k are used in training
    counterfactual_per_fact: int = 2
    test_fraction: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Entity:
    id: str
    kind: str
    name: str
    known: bool  # False: never shown in training (insertion)
    facts: dict[str, str]  # relation -> value
    look: dict[str, Any]  # rendering parameters
    images: list[str] = field(default_factory=list)  # paths relative to world dir


@dataclass
class QA:
    """One question-answer item. image is a path relative to the world dir or None."""

    question: str
    answer: str
    image: str | None
    constraints: list[str]
    entity: str | None = None
    relation: str | None = None
    template: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _make_names(rng: random.Random, n: int, taken: set[str], min_len: int = 4) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        syl = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syl - 1))
        word += rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
        if len(word) < min_len or word in taken:
            continue
        taken.add(word)
        names.append(word)
    return names


def template_words() -> set[str]:
    """Every word that a template, constraint or fixed value uses."""
    words: set[str] = set()
    texts: list[str] = []
    for r in RELATIONS:
        texts += list(r.train_templates) + list(r.heldout_templates)
    for t in KIND_IDENTITY_TEMPLATES.values():
        texts += t
    texts += [m[0] for m in MULTI_CONSTRAINT.values()]
    texts += list(CITY_COUNTRY_TEMPLATES_TRAIN + CITY_COUNTRY_TEMPLATES_HELDOUT)
    texts += list(KIND_CONSTRAINT.values())
    for t in texts:
        words.update(w for w in t.replace("{s}", " ").replace("{c}", " ").split())
    words.update(PROFESSIONS, PRODUCTS, YEARS)
    return words


class World:
    """The generated world: entities, value vocabularies and all question sets."""

    def __init__(self, config: WorldConfig):
        self.config = config
        rng = random.Random(f"editlens-world-{config.seed}")
        taken = set(template_words())
        self.countries = _make_names(rng, config.n_countries, taken, min_len=5)
        self.cities = _make_names(rng, config.n_cities, taken)
        self.city_country = {c: self.countries[i % len(self.countries)] for i, c in enumerate(self.cities)}
        first = _make_names(rng, config.n_person_names, taken)
        last = _make_names(rng, config.n_person_names, taken)
        self.person_names = [f"{a} {b}" for a, b in zip(first, last)]
        n_total = config.known_per_kind + config.unseen_per_kind
        self.entities: list[Entity] = []
        brand_names = _make_names(rng, n_total, taken)
        names_by_kind = {
            "landmark": _make_names(rng, n_total, taken),
            "person": _make_names(rng, n_total, taken),
            "brand": brand_names,
        }
        known_brands = brand_names[: config.known_per_kind]
        pools = {
            "city": self.cities,
            "year": list(YEARS),
            "person_name": self.person_names,
            "profession": list(PROFESSIONS),
            "brand_name": known_brands,
            "country": self.countries,
            "product": list(PRODUCTS),
        }
        self.value_pools = pools
        from .render import sample_looks  # local import: render is heavier (PIL)

        for kind in KIND_CONSTRAINT:
            looks = sample_looks(rng, kind, n_total)
            for i in range(n_total):
                facts = {r.name: rng.choice(pools[r.value_pool]) for r in RELATIONS if r.kind == kind}
                ent = Entity(
                    id=f"{kind}-{i:02d}",
                    kind=kind,
                    name=names_by_kind[kind][i],
                    known=i < config.known_per_kind,
                    facts=facts,
                    look=looks[i],
                )
                ent.images = [f"images/{ent.id}-{k}.png" for k in range(config.renderings)]
                self.entities.append(ent)

        # Entities known only from text, as a language model knows far more
        # entities than it ever sees in images. Their facts run through every
        # value of every relation's pool, so every value is an attested answer
        # to its relation's questions: the read-out from the subject's state to
        # the answer is then a general one, which is what lets an edit at the
        # visual constraint write any value (world check, MultEdit).
        trng = random.Random(f"editlens-text-entities-{config.seed}")
        self.text_only: list[Entity] = []
        for kind in KIND_CONSTRAINT:
            names = _make_names(trng, config.text_only_per_kind, taken)
            rels = [r for r in RELATIONS if r.kind == kind]
            cycles = {}
            for r in rels:
                vals = list(pools[r.value_pool])
                trng.shuffle(vals)
                cycles[r.name] = vals
            for i, name in enumerate(names):
                facts = {r.name: cycles[r.name][i % len(cycles[r.name])] for r in rels}
                self.text_only.append(
                    Entity(id=f"{kind}-text-{i:02d}", kind=kind, name=name, known=True, facts=facts, look={})
                )

    # ------------------------------------------------------------------ lookups
    @property
    def known(self) -> list[Entity]:
        return [e for e in self.entities if e.known]

    @property
    def unseen(self) -> list[Entity]:
        return [e for e in self.entities if not e.known]

    def relations_of(self, kind: str) -> list[Relation]:
        return [r for r in RELATIONS if r.kind == kind]

    def words(self) -> set[str]:
        """The complete word vocabulary of the world (for the tokenizer)."""
        w = template_words()
        w.update(self.countries, self.cities)
        for n in self.person_names:
            w.update(n.split())
        for e in self.entities + self.text_only:
            w.add(e.name)
        return w

    # ------------------------------------------------------------- questions
    def visual_qa(self, ent: Entity, rel: Relation, template: str, rendering: int) -> QA:
        constraint = KIND_CONSTRAINT[ent.kind]
        return QA(
            template.format(s=constraint),
            ent.facts[rel.name],
            ent.images[rendering],
            [constraint],
            ent.id,
            rel.name,
            template,
        )

    def name_qa(self, ent: Entity, rel: Relation, template: str) -> QA:
        return QA(template.format(s=ent.name), ent.facts[rel.name], None, [ent.name], ent.id, rel.name, template)

    def multi_constraint_qa(self, ent: Entity, rendering: int) -> QA:
        template, target, given, phrase = MULTI_CONSTRAINT[ent.kind]
        constraint = KIND_CONSTRAINT[ent.kind]
        value = ent.facts[given]
        q = template.format(s=constraint, c=value)
        return QA(
            q, ent.facts[target], ent.images[rendering], [constraint, phrase.format(c=value)], ent.id, target, template
        )

    def identity_qa(self, ent: Entity, template: str, rendering: int) -> QA:
        constraint = KIND_CONSTRAINT[ent.kind]
        return QA(
            template.format(s=constraint),
            ent.name,
            ent.images[rendering],
            [constraint] if "{s}" in template else [],
            ent.id,
            "name",
            template,
        )

    def city_fact_qa(self, city: str, template: str) -> QA:
        return QA(template.format(c=city), self.city_country[city], None, [city], None, "city_country", template)

    def training_set(self) -> list[QA]:
        """Everything the model is trained on (known entities only)."""
        items: list[QA] = []
        tr = range(self.config.train_renderings)
        for ent in self.known:
            for rel in self.relations_of(ent.kind):
                for t in rel.train_templates:
                    for k in tr:
                        items.append(self.visual_qa(ent, rel, t, k))
                    items.append(self.name_qa(ent, rel, t))
            for t in KIND_IDENTITY_TEMPLATES[ent.kind]:
                for k in tr:
                    items.append(self.identity_qa(ent, t, k))
            for k in tr:
                items.append(self.multi_constraint_qa(ent, k))
        for ent in self.text_only:
            for rel in self.relations_of(ent.kind):
                for t in rel.train_templates:
                    items.append(self.name_qa(ent, rel, t))
        for city in self.cities:
            for t in CITY_COUNTRY_TEMPLATES_TRAIN:
                items.append(self.city_fact_qa(city, t))
        return items

    def heldout_paraphrase_questions(self) -> list[QA]:
        """Held-out question templates on the training renderings."""
        return [
            self.visual_qa(e, r, t, k)
            for e in self.known
            for r in self.relations_of(e.kind)
            for t in r.heldout_templates
            for k in range(self.config.train_renderings)
        ]

    def heldout_image_questions(self) -> list[QA]:
        """Training templates on renderings never seen in training."""
        return [
            self.visual_qa(e, r, t, k)
            for e in self.known
            for r in self.relations_of(e.kind)
            for t in r.train_templates
            for k in range(self.config.train_renderings, self.config.renderings)
        ]

    def text_fact_questions(self) -> list[QA]:
        """Text-only facts: entity-name questions and city→country facts (no image)."""
        items = [
            self.name_qa(e, r, t)
            for e in self.known + self.text_only
            for r in self.relations_of(e.kind)
            for t in r.train_templates
        ]
        items += [self.city_fact_qa(c, t) for c in self.cities for t in CITY_COUNTRY_TEMPLATES_TRAIN]
        return items

    def multi_constraint_questions(self) -> list[QA]:
        return [self.multi_constraint_qa(e, k) for e in self.known for k in range(self.config.renderings)]

    # ------------------------------------------------------------ edit cases
    def edit_cases(self) -> dict[str, list[dict[str, Any]]]:
        """E-VQA-shaped edit cases, split into train and test.

        ``pred`` (the model's answer before the edit) is filled in by the
        builder once the model exists; here it is None.
        """
        rng = random.Random(f"editlens-cases-{self.config.seed}")
        cfg = self.config
        known = self.known
        cases: list[dict[str, Any]] = []
        text_locality = self.text_fact_questions()

        def locality(ent: Entity) -> dict[str, Any]:
            loc = rng.choice([q for q in text_locality if q.entity != ent.id])
            other = rng.choice([e for e in known if e.id != ent.id])
            rel = rng.choice(self.relations_of(other.kind))
            mq = self.visual_qa(other, rel, rng.choice(rel.train_templates), rng.randrange(cfg.train_renderings))
            return {
                "loc": loc.question,
                "loc_ans": loc.answer,
                "m_loc": mq.image,
                "m_loc_q": mq.question,
                "m_loc_a": mq.answer,
            }

        def case(ent: Entity, rel: Relation, alt: str, kind: str) -> dict[str, Any]:
            constraint = KIND_CONSTRAINT[ent.kind]
            src_t = rng.choice(rel.train_templates)
            reph_t = rng.choice(rel.heldout_templates)
            k = rng.randrange(cfg.train_renderings)
            k2 = rng.randrange(cfg.train_renderings, cfg.renderings)
            rec = {
                "case_id": "",
                "type": kind,
                "entity": ent.id,
                "entity_name": ent.name,
                "relation": rel.name,
                "constraint": constraint,
                "src": src_t.format(s=constraint),
                "rephrase": reph_t.format(s=constraint),
                "alt": alt,
                "ground_truth": ent.facts[rel.name],
                "pred": None,
                "image": ent.images[k],
                # another rendering the model was trained on (for an unseen
                # entity: another rendering), and one never seen in training
                "image_rephrase": ent.images[(k + 1 + k2 - cfg.train_renderings) % cfg.train_renderings],
                "image_heldout": ent.images[k2],
            }
            rec.update(locality(ent))
            return rec

        for ent in known:
            for rel in self.relations_of(ent.kind):
                pool = [v for v in self.value_pools[rel.value_pool] if v != ent.facts[rel.name]]
                for alt in rng.sample(pool, cfg.counterfactual_per_fact):
                    cases.append(case(ent, rel, alt, "counterfactual"))
        for ent in self.unseen:
            for rel in self.relations_of(ent.kind):
                cases.append(case(ent, rel, ent.facts[rel.name], "insertion"))
        # Split by entity so that no test entity is seen by an editor trained on
        # the train split (VisEdit trains on edit cases).
        ent_ids = sorted({c["entity"] for c in cases})
        rng.shuffle(ent_ids)
        n_test = int(round(len(ent_ids) * cfg.test_fraction))
        test_ids = set(ent_ids[:n_test])
        split: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
        for c in cases:
            s = "test" if c["entity"] in test_ids else "train"
            c["case_id"] = f"{s}-{len(split[s]):04d}"
            split[s].append(c)
        return split

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "countries": self.countries,
            "cities": self.cities,
            "city_country": self.city_country,
            "person_names": self.person_names,
            "kind_constraint": KIND_CONSTRAINT,
            "relations": [dataclasses.asdict(r) for r in RELATIONS],
            "entities": [dataclasses.asdict(e) for e in self.entities],
            "text_only_entities": [dataclasses.asdict(e) for e in self.text_only],
        }
