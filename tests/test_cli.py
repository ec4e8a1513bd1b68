"""The editlens CLI: JSON output, and clear messages (no tracebacks) for bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.cli import app

runner = CliRunner()


def test_world_build_json_reports_the_figures(world_summary):
    res = runner.invoke(app, ["world", "build", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("train_accuracy", "heldout_paraphrase_accuracy", "text_fact_accuracy", "build_seconds", "path"):
        assert key in out
    assert out["cached"] is True and out["path"] == world_summary["path"]


@pytest.mark.numerics
def test_ask_answers_and_scores(world_dir, test_cases):
    case = next(c for c in test_cases if c["type"] == "counterfactual" and c["pred"] == c["ground_truth"])
    res = runner.invoke(
        app,
        [
            "ask",
            case["src"],
            "--image",
            str(world_dir / case["image"]),
            "--answer",
            case["ground_truth"],
            "--constraint",
            case["constraint"],
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["answer"] == case["ground_truth"]
    assert out["scored"]["token_accuracy"] == 1.0
    assert out["constraints"][0]["tokens"] == case["constraint"].split()


def _fails_cleanly(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    assert "Traceback" not in res.output


def test_bad_input_gives_clear_errors(tmp_path, world_dir):
    _fails_cleanly(
        ["ask", "which city is this landmark in ?", "--model", str(tmp_path / "missing")], "model folder not found"
    )
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    _fails_cleanly(["ask", "q ?", "--model", str(tmp_path)], "not a vision-language family EditLens knows")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    _fails_cleanly(
        ["ask", "which city is this landmark in ?", "--image", str(bad), "--model", str(world_dir / "model")],
        "cannot decode",
    )
    _fails_cleanly(
        ["ask", "which city is this landmark in ?", "--constraint", "this brand", "--model", str(world_dir / "model")],
        "does not occur in the question",
    )


def test_console_script_is_installed():
    beside = Path(sys.executable).parent / "editlens"  # the venv's bin, activated or not
    exe = str(beside) if beside.exists() else shutil.which("editlens")
    assert exe, "the editlens console script is not installed (pip install -e .)"
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "world" in res.stdout
