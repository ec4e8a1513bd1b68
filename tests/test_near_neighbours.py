"""Near neighbours for the benches' modal locality: another subject whose look differs from the edited subject's
in exactly one attribute (``vlm.world.stream.NearNeighbours``), drawn without touching the world folder."""

import io

from bench.harness import near_summary, with_near_neighbours
from vlm.world.render import render_entity
from vlm.world.stream import LOOK_ATTRIBUTES, NearNeighbours, edit_stream, load_world, look_difference


def test_a_near_neighbour_is_another_subject_one_look_attribute_away(world_dir):
    world = load_world(world_dir)
    near = NearNeighbours(world)
    subjects = [e.id for e in world.entities] + [r["entity"] for r in edit_stream(world, 300)]
    found = 0
    for sid in dict.fromkeys(subjects):
        subject = near.entities[sid]
        nb = near.of(sid)
        candidates = near.candidates(sid)
        for other in candidates:  # every candidate is one attribute away, of the same kind
            assert (
                other.id != sid and other.kind == subject.kind and len(look_difference(subject.look, other.look)) == 1
            )
        if nb is None:
            assert not candidates  # none only where no subject has such a look
            continue
        found += 1
        assert nb.entity.id != sid and nb.entity.kind == subject.kind and nb.entity in candidates
        assert look_difference(subject.look, nb.entity.look) == [nb.attribute] and nb.attribute in LOOK_ATTRIBUTES
        differing = [k for k in LOOK_ATTRIBUTES if subject.look[k] != nb.entity.look[k]]
        assert differing == [nb.attribute]  # exactly one attribute, every other the same
        if any(c.known for c in candidates):  # the world's known entities are preferred: drawn, and known
            assert nb.source == "known" and nb.entity.known
        assert all(nb.answer(r.name) == nb.entity.facts[r.name] for r in world.relations_of(subject.kind))
    assert found > 0.7 * len(dict.fromkeys(subjects))
    again = NearNeighbours(load_world(world_dir))  # a function of the world alone
    assert [again.of(s) for s in subjects[:60]] == [near.of(s) for s in subjects[:60]]


def test_a_stream_neighbour_not_drawn_yet_is_drawn_into_the_scratch_folder_as_the_stream_draws_it(
    world_dir, test_cases, tmp_path
):
    world = load_world(world_dir)
    near = NearNeighbours(world)
    nb = next(n for c in test_cases if (n := near.of(c["entity"])) is not None and n.source == "stream")
    ent, k = nb.entity, nb.rendering
    # a world folder where the stream has drawn nothing: the drawing goes to the scratch folder
    path = near.draw(tmp_path / "no-drawings", nb, tmp_path / "scratch")
    assert path.parent == tmp_path / "scratch" and path.is_file()
    expected = io.BytesIO()
    render_entity(ent.kind, ent.look, f"{world.config.seed}-{ent.id}-{k}").save(expected, format="PNG")
    assert path.read_bytes() == expected.getvalue()  # the picture render_stream_images draws, bit for bit
    if (world_dir / nb.image).is_file():  # drawn by the stream already: the world's file is used as it is
        assert near.draw(world_dir, nb, tmp_path / "unused") == world_dir / nb.image
        assert (world_dir / nb.image).read_bytes() == expected.getvalue()

    cases = test_cases[:40]
    before = [dict(c) for c in cases]
    out = with_near_neighbours(world_dir, cases, tmp_path / "bench")
    assert cases == before  # the cases are copied, never changed
    summary = near_summary(out)
    assert summary["cases"] + summary["without"] == len(cases) and summary["cases"] > 0
    assert sum(summary["attribute"].values()) == sum(summary["source"].values()) == summary["cases"]
    for c, o in zip(cases, out):
        if "image_near" not in o:
            assert near.of(c["entity"]) is None
            continue
        assert o["near_entity"] != c["entity"] and (world_dir / o["image_near"]).is_file()
        assert o["near_answer"] == near.entities[o["near_entity"]].facts[c["relation"]]
