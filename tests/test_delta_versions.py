"""Delta versions: an edit set stored as what it adds to its parent (``editors.delta``), and a lineage of versions
that stores only each version's own edits, loads by composing its deltas, refuses to lose an ancestor and is
written whole again by ``squash`` (``server.bundles``)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from client.cli import app
from client.sdk import FailedPreconditionError
from editors.delta import diff, load_delta, save_delta
from editors.edit_set import EditSet, LowRankDelta
from editors.files import EditSetError


def _edit_set(columns: list[torch.Tensor], records: int, merged: bool = False) -> EditSet:
    """An edit set of one module whose i-th edit is column ``columns[i]`` (U) with a fixed V column."""
    V = torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(i)) for i in range(len(columns))], 1)
    U = torch.stack(columns, 1)
    if merged:  # one delta whose rank grows with the edits
        deltas = [LowRankDelta(0, "m.down_proj", U, V)]
    else:  # one delta per edit
        deltas = [LowRankDelta(0, "m.down_proj", U[:, i : i + 1], V[:, i : i + 1]) for i in range(len(columns))]
    recs = [{"request": {"question": f"q{i}"}, "metrics": {"p_after": 0.9}} for i in range(records)]
    return EditSet(deltas, "fp", "multedit", {"steps": 10, "evidence": list(range(50))}, recs)


def _same(a: EditSet, b: EditSet) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta) and a.manifest() == b.manifest()


@pytest.mark.parametrize("merged", [False, True])
def test_a_delta_stores_only_what_the_child_adds_and_rebuilds_it_exactly(tmp_path, merged):
    cols = [torch.randn(8) for _ in range(40)]
    parent = _edit_set(cols, 40, merged)
    child_cols = [c.clone() for c in cols] + [torch.randn(8)]
    if merged:
        child_cols[3] = torch.randn(8)  # an edit re-optimised in place: one replaced column, then one new
    child = _edit_set(child_cols, 41, merged)
    whole = child.save(tmp_path / "whole.safetensors")
    size = save_delta(child, parent, tmp_path / "delta.safetensors")
    assert size is not None and size < whole / 4, (size, whole)
    rebuilt = load_delta(tmp_path / "delta.safetensors", parent)
    assert _same(rebuilt, child)
    _, manifest = diff(child, parent)
    assert manifest["fields"]["records"] == {"appended": [child.records[-1]], "after": 40}
    assert manifest["fields"]["hyperparameters"] == {"same": True}
    if merged:
        assert manifest["tensors"]["delta.0.U"] == {"kind": "grown", "dim": 1, "kept": 40, "replaced": 1}


def test_a_delta_applies_to_its_own_parent_only(tmp_path):
    cols = [torch.randn(8) for _ in range(3)]
    parent, other = _edit_set(cols, 3), _edit_set([c + 1 for c in cols], 3)
    child = _edit_set(cols + [torch.randn(8)], 4)
    save_delta(child, parent, tmp_path / "d.safetensors")
    with pytest.raises(EditSetError, match="another parent edit set"):
        load_delta(tmp_path / "d.safetensors", other)
    with pytest.raises(EditSetError, match="not a readable safetensors file|not found"):
        (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 12)
        load_delta(tmp_path / "broken.safetensors", parent)
    other_editor = EditSet(child.deltas, "fp", "alphaedit", {}, child.records)
    assert diff(other_editor, parent) is None  # another editor: stored whole by the caller


@pytest.mark.slow
def test_a_lineage_of_delta_versions_serves_refuses_to_lose_an_ancestor_and_squashes(
    start_service, world_dir, keygate_case, insertion_case
):
    from server.bundles import squash

    svc = start_service()
    kc, ic = keygate_case, insertion_case
    with svc.client() as lens:

        def edit(case, question, editor):
            """One edit on the live version; made live even where it misses its answer (what an optimisation
            reaches is not this test's subject: the lineage is)."""
            v = lens.edit(
                world_dir / case["image"],
                question,
                case["constraint"],
                case["ground_truth"],
                adapter="a",
                editor=editor,
                layer=0,
                keep_unreached=True,
            )
            if not v.live:
                lens.promote(v.version, adapter="a")
            return v

        v1 = edit(kc, kc["src"], "keygate")
        v2 = edit(ic, ic["src"], "multedit")
        v3 = edit(kc, kc["rephrase"], "keygate")  # the same subject: its KeyGate entry is written again
        assert (v1.version, v2.version, v3.version) == (1, 2, 3)
        m2, m3 = v2.manifest, v3.manifest
        assert m2["delta_of"] == 1 and m2["inherited"] == ["keygate"] and "multedit.safetensors" in v2.files
        assert m3["delta_of"] == 2 and m3["deltas"] == ["keygate"] and m3["inherited"] == ["multedit"]
        assert "keygate.delta.safetensors" in v3.files and "keygate.safetensors" not in v3.files
        # the client sees every edit of the lineage, as a version stored whole records them
        got = lens.version(3, adapter="a")
        assert [e.version for e in got.edits] == [1, 2, 3] and got.num_edits == 3
        answers = {v: lens.generate(world_dir / kc["image"], kc["src"], adapter="a", version=v).text for v in (1, 3)}
        with pytest.raises(FailedPreconditionError, match="squash"):
            lens.delete(2, adapter="a")

    # another server on the same registry loads version 3 from its files alone: the lineage composed
    other = start_service(data_dir=svc.data_dir)
    with other.client() as lens:
        assert lens.generate(world_dir / kc["image"], kc["src"], adapter="a", version=3).text == answers[3]
        assert lens.generate(world_dir / kc["image"], kc["src"], adapter="a", version=1).text == answers[1]

    # the CLI squashes version 3 (the registry the servers use, read directly)
    done = CliRunner().invoke(app, ["registry", "squash", "a", "3", "--registry-dir", str(svc.data_dir)])
    assert done.exit_code == 0 and "stored whole as version 4 (live): 3 edit(s)" in done.output, done.output
    missing = CliRunner().invoke(app, ["registry", "squash", "nope", "1", "--registry-dir", str(svc.data_dir)])
    assert missing.exit_code == 2 and "nope" in missing.output and "Traceback" not in missing.output
    squashed = svc.registry.version("a", 4)
    assert squashed.is_live and squashed.delta_of is None and squashed.parent == 3
    assert {"keygate.safetensors", "multedit.safetensors"} <= set(squashed.files)
    assert len(squashed.manifest["edits"]) == 3
    with pytest.raises(ValueError, match="stored whole already"):
        squash(svc.registry, "a", 4)
    with other.client() as lens:
        assert lens.generate(world_dir / kc["image"], kc["src"], adapter="a", version=4).text == answers[3]
        assert [e.version for e in lens.version(4, adapter="a").edits] == [1, 2, 3]
