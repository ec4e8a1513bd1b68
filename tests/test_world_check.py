"""The world model recalls visual facts through the constraint tokens (issue 3),
measured with `editors.world_check` on a sample small enough for CI."""

import json

import pytest
from typer.testing import CliRunner

from client.cli import app
from editors.world_check import check_world


@pytest.mark.numerics
@pytest.mark.slow
def test_the_answer_flows_through_the_constraint_and_an_edit_there_works(vlm, world_dir):
    r = check_world(world_dir, vlm=vlm, questions=60, cases=10, layers=[0, 1])
    assert r["questions"] == 60 and r["cases"] == 10
    # blocking the constraint from the image destroys the answer; blocking the last position hardly matters
    assert r["constraint_knockout_drop"] >= 0.5
    assert r["last_knockout_drop"] < r["constraint_knockout_drop"] / 2
    # a rank-one edit of an early MLP at the constraint's last token reaches the new answer
    assert r["constraint_edit_success"] >= 0.8
    # the figure is the best of the layers tried, reported with that layer
    by_layer = {int(k): v["success"] for k, v in r["edit_by_layer"].items()}
    assert set(by_layer) == {0, 1} and r["constraint_edit_success"] == max(by_layer.values())
    assert by_layer[r["constraint_edit_layer"]] == r["constraint_edit_success"]


@pytest.mark.slow
def test_cli_world_check_reports_json_and_rejects_bad_input(world_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["world", "check", "--world", str(world_dir), "--questions", "10", "--cases", "2", "--layer", "0", "--json"],
    )
    out = json.loads(res.stdout)
    assert {
        "constraint_knockout_drop",
        "last_knockout_drop",
        "constraint_edit_success",
        "constraint_edit_layer",
        "identification",
        "key_identification",
    } <= set(out)
    assert res.exit_code == (0 if out["passed"] else 1)
    res = runner.invoke(app, ["world", "check", "--world", str(tmp_path)])
    assert res.exit_code == 2 and "no built world" in res.stderr
    res = runner.invoke(app, ["world", "check", "--world", str(world_dir), "--layer", "99"])
    assert res.exit_code == 2 and "outside" in res.stderr


def test_identification_is_a_nearest_neighbour_rate_of_own_subjects():
    """The measure itself: renderings that are their subject's edit image up to a small perturbation are all
    identified; the same queries assigned to shuffled subjects are identified at about chance."""
    import torch

    from editors.identification import _nearest_is_own

    g = torch.Generator().manual_seed(0)
    refs = torch.randn(200, 32, generator=g)
    near = refs + 0.05 * torch.randn(200, 32, generator=g)
    assert _nearest_is_own(refs, {"a": near, "b": near})["all"] == 1.0
    shuffled = near[torch.randperm(200, generator=g)]
    assert _nearest_is_own(refs, {"a": shuffled})["all"] < 0.05


@pytest.mark.slow
def test_the_world_model_identifies_new_subjects_far_above_chance(vlm, world_dir):
    from editors.identification import identification

    r = identification(vlm, world_dir, limit=120)
    assert r["identification_subjects"] == 120 and r["identification_chance"] == pytest.approx(1 / 120)
    for name in ("identification", "key_identification"):
        assert 0.0 <= r[name] <= 1.0
        assert r[name] >= 5 * r["identification_chance"], r  # the tower sees something of each look
