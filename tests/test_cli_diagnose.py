"""`editlens diagnose ...` and `editlens bench diagnostics` from the command line."""

import json

import pytest
from typer.testing import CliRunner

from client.cli import app

runner = CliRunner()


def _single(world_dir, case, *extra):
    return [
        "--model",
        str(world_dir / "model"),
        "--image",
        str(world_dir / case["image"]),
        "--question",
        case["src"],
        "--constraint",
        case["constraint"],
        *extra,
    ]


@pytest.mark.numerics
def test_trace_renders_a_png_and_prints_json(world_dir, test_cases, tmp_path):
    png = tmp_path / "trace.png"
    res = runner.invoke(
        app, ["diagnose", "trace", *_single(world_dir, test_cases[0], "--kind", "mlp", "--json", "--out", str(png))]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["method"] == "token-replacement" and out["kinds"] == ["mlp"] and out["png"] == str(png)
    assert len(out["effects"]["mlp"]) == len(out["rows"]) and out["p_clean"] > out["p_corrupt"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_averaged_views_over_a_case_file(world_dir, tmp_path):
    cases = str(world_dir / "edit_cases" / "test.json")
    res = runner.invoke(
        app,
        [
            "diagnose",
            "knockout",
            "--model",
            str(world_dir / "model"),
            "--cases",
            cases,
            "--limit",
            "2",
            "--out",
            str(tmp_path / "ko.png"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "mean of 2 cases" in res.stdout and "question->last" in res.stdout
    assert (tmp_path / "ko.png").is_file()
    res = runner.invoke(
        app,
        [
            "diagnose",
            "contributions",
            "--model",
            str(world_dir / "model"),
            "--cases",
            cases,
            "--limit",
            "3",
            "--variant",
            "src",
            "--variant",
            "image_heldout",
            "--json",
            "--out",
            str(tmp_path / "c.png"),
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["cases"] == 6 and set(out["auroc"]) == {"early_score", "confidence"}
    assert all(p.endswith(".png") for p in out["png"])
    res = runner.invoke(
        app, ["diagnose", "recommend", "--model", str(world_dir / "model"), "--cases", cases, "--limit", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out) == {"multedit", "visedit"} and out["multedit"]["layer"] in out["multedit"]["candidates"]
    base = ["diagnose", "recommend", "--model", str(world_dir / "model"), "--cases", cases, "--limit", "1"]
    res = runner.invoke(app, [*base, "--editor", "keygate", "--json"])  # KeyGate picks its layer as MultEdit does
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)) == {"multedit"}
    res = runner.invoke(app, [*base, "--editor", "ft"])
    assert res.exit_code == 2 and "chooses no layer by a diagnostic" in res.stderr


def test_bad_input_exits_with_a_message(world_dir, test_cases):
    case = test_cases[0]
    for args, message in [
        (["diagnose", "trace", *_single(world_dir, dict(case, constraint="this river"))], "does not occur"),
        (["diagnose", "trace", *_single(world_dir, case, "--window", "99")], "larger than the model"),
        (["diagnose", "trace", *_single(world_dir, case, "--replace", "a b c d e f")], "replacement"),
        (["diagnose", "knockout", *_single(world_dir, case, "--relation", "x->y")], "unknown knockout relation"),
        (
            [
                "diagnose",
                "module-attribution",
                "--model",
                str(world_dir / "model"),
                "--image",
                "/no/such.png",
                "--question",
                "q ?",
                "--constraint",
                "q",
            ],
            "image not found",
        ),
        (["diagnose", "trace", *_single(world_dir, case, "--out", "x.jpg")], ".png"),
    ]:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and "Traceback" not in res.output


def test_bench_diagnostics_prints_the_ratio(world_dir):
    res = runner.invoke(
        app,
        [
            "bench",
            "diagnostics",
            "--world",
            str(world_dir),
            "--cases",
            "1",
            "--diagnostic",
            "knockout",
            "--ground-truth-cases",
            "0",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)["speed"]["knockout"]
    assert r["max_abs_diff"] < 1e-5 and r["speedup"] > 0 and r["forward_passes"]["batched"] < r["cells"]
