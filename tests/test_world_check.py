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
    } <= set(out)
    assert res.exit_code == (0 if out["passed"] else 1)
    res = runner.invoke(app, ["world", "check", "--world", str(tmp_path)])
    assert res.exit_code == 2 and "no built world" in res.stderr
    res = runner.invoke(app, ["world", "check", "--world", str(world_dir), "--layer", "99"])
    assert res.exit_code == 2 and "outside" in res.stderr
