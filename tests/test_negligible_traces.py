"""Diagnostics say when they localise nothing (issue 27 item 7): a trace whose every indirect effect is below
``NEGLIGIBLE_EFFECT`` names no layer, says why in its text, its figure title and its colour scale (noise stays
pale), and the layer recommendation built on such traces recommends none (an auto edit's fallback layer is
labelled as one). The same trace with one real effect still recommends its layer."""

from __future__ import annotations

import pytest
from PIL import Image

from diagnostics import recommend as rec_module
from diagnostics.report import _trace_report
from diagnostics.trace import NEGLIGIBLE_EFFECT, TraceResult, TraceRow


def _trace(peak: float) -> TraceResult:
    rows = [TraceRow("image (all)", [1, 2], "image"), TraceRow("landmark", [5], "constraint last", constraint=True)]
    effects = [[1e-6, 2e-6, 0.0, 0.0], [1.2e-5, peak, 3e-6, 0.0]]
    return TraceResult(
        "token-replacement", ["mlp"], 1, rows, {"mlp": effects}, 0.999, 0.0, "skekrork", "which city ?", label="x"
    )


def test_a_trace_of_noise_recommends_no_layer_and_says_so(tmp_path):
    quiet = _trace(4e-5)
    assert not quiet.localises and quiet.largest_effect == pytest.approx(4e-5)
    report = _trace_report("trace", [quiet], tmp_path / "quiet.png")
    assert report.recommended_layer is None
    assert any("localises nothing" in line and "no layer is recommended" in line for line in report.lines)
    assert Image.open(report.figures[0]).size[0] > 0
    loud = _trace(0.4)
    assert loud.localises
    report = _trace_report("trace", [loud], tmp_path / "loud.png")
    assert report.recommended_layer == 1 and not any("localises nothing" in line for line in report.lines)


def test_a_recommendation_on_noise_recommends_none_and_labels_the_fallback(monkeypatch, vlm):
    from diagnostics.cases import DiagnosticCase

    n = vlm.num_layers

    def fake_trace(vlm, case, kinds, window, roles, isolate=False, replacement=None):
        effects = [[1e-5 * (l + 1) for l in range(n)]]
        return TraceResult(
            "token-replacement",
            kinds,
            window,
            [TraceRow("c", [3], "constraint last", True)],
            {"mlp": effects},
            0.9,
            0.0,
            "a",
            "q",
            replacement="r",
        )

    monkeypatch.setattr(rec_module, "causal_trace", fake_trace)
    r = rec_module.recommend_multedit_layer(vlm, [DiagnosticCase("which city is this landmark in ?", "this landmark")])
    assert not r.localised and "nothing localised" in r.criterion and str(NEGLIGIBLE_EFFECT) in r.criterion
    assert r.layer in r.candidates  # the fallback an auto edit uses, named as such
    assert r.to_dict()["localised"] is False
