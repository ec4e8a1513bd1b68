"""The world generator: deterministic, well-formed, with the promised parts."""

from vlm.world.spec import KIND_CONSTRAINT, RELATIONS, World, WorldConfig

EVQA_FIELDS = {
    "src",
    "rephrase",
    "alt",
    "pred",
    "image",
    "image_rephrase",
    "loc",
    "loc_ans",
    "m_loc",
    "m_loc_q",
    "m_loc_a",
}


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = World(WorldConfig(seed=0)), World(WorldConfig(seed=0)), World(WorldConfig(seed=1))
    assert a.to_dict() == b.to_dict()
    assert a.edit_cases() == b.edit_cases()
    assert a.to_dict()["entities"] != c.to_dict()["entities"]
    assert [e.name for e in a.entities] != [e.name for e in c.entities]


def test_entities_kinds_and_distinct_looks():
    w = World(WorldConfig())
    assert {e.kind for e in w.entities} == set(KIND_CONSTRAINT)
    names = [e.name for e in w.entities]
    assert len(set(names)) == len(names)
    for kind in KIND_CONSTRAINT:
        looks = [tuple(sorted(e.look.items())) for e in w.entities if e.kind == kind]
        assert len(set(looks)) == len(looks), "two entities of one kind look the same"


def test_paraphrases_are_split_and_disjoint():
    for r in RELATIONS:
        assert r.train_templates and r.heldout_templates
        assert not set(r.train_templates) & set(r.heldout_templates)


def test_training_set_excludes_heldout_and_unseen():
    w = World(WorldConfig())
    train = w.training_set()
    unseen_ids = {e.id for e in w.unseen}
    unseen_names = {e.name for e in w.unseen}
    heldout = {t for r in RELATIONS for t in r.heldout_templates}
    heldout_imgs = {img for e in w.entities for img in e.images[w.config.train_renderings :]}
    for q in train:
        assert q.entity not in unseen_ids
        assert q.template not in heldout
        assert q.image not in heldout_imgs
        assert not set(q.question.split()) & unseen_names
    kinds = {(q.image is None, len(q.constraints)) for q in train}
    assert (False, 2) in kinds, "multi-constraint questions are missing"
    assert (True, 1) in kinds, "text-only questions are missing"


def test_edit_cases_shape_and_splits():
    w = World(WorldConfig())
    cases = w.edit_cases()
    assert len(cases["test"]) >= 100
    for _split, items in cases.items():
        for c in items:
            assert EVQA_FIELDS <= set(c)
            assert c["alt"] != c["ground_truth"] or c["type"] == "insertion"
            assert c["image"] != c["image_rephrase"] != c["image_heldout"]
            # modal generality asks about another training rendering; image_heldout was never trained on
            k = int(c["image_rephrase"].rsplit("-", 1)[1].split(".")[0])
            h = int(c["image_heldout"].rsplit("-", 1)[1].split(".")[0])
            assert k < w.config.train_renderings <= h
            assert c["src"] != c["rephrase"]
            assert c["constraint"] in c["src"] and c["constraint"] in c["rephrase"]
    train_ents = {c["entity"] for c in cases["train"]}
    test_ents = {c["entity"] for c in cases["test"]}
    assert not train_ents & test_ents
    types = {c["type"] for c in cases["test"]}
    assert types == {"counterfactual", "insertion"}
