"""E-VQA metrics as EasyEdit computes them, on real edits of the world model."""

import pytest
from choosing import first_with

from editors import metrics as M
from editors.attach import attach
from editors.multedit import EditRequest, MultEdit, MultEditConfig
from vlm import score_answers


@pytest.mark.numerics
def test_metrics_before_and_after_an_edit(vlm, world_dir, test_cases):
    px = M.PixelCache(vlm, world_dir)
    editor = MultEdit(vlm, MultEditConfig(layer=0))

    def answered(case) -> bool:  # cases whose edit answers (tests/choosing.py): reliability 1 is then the truth
        req = EditRequest.from_case(case, world_dir, pixel_values=px(case["image"]))
        with attach(vlm, editor.edit([req])):
            return score_answers(vlm, [editor.encode(req)])[0].exact

    def of(kind, n):
        return first_with([c for c in test_cases if c["type"] == kind], answered, n, f"{kind}s are answered")

    cases = of("counterfactual", 2) + of("insertion", 1)
    cps = [M.case_prompts(vlm, c, px) for c in cases]
    panel = M.specificity_panel(vlm, world_dir, px, 12)
    base = M.baseline(vlm, cps, panel)
    # nothing attached: locality is agreement with itself, the counterfactual answer is not given
    unedited = M.evaluate_single_edits(vlm, cps, base, [[] for _ in cases])
    for row in unedited:
        assert row["text_locality"] == 1.0 and row["modal_locality"] == 1.0
        assert row["specificity_after"] == row["specificity_before"]
    assert unedited[0]["reliability"] < 1.0 and unedited[0]["efficacy"] < 0.05
    edits = MultEdit(vlm, MultEditConfig(layer=0)).edit_each(
        [EditRequest.from_case(c, world_dir, pixel_values=px(c["image"])) for c in cases]
    )
    rows = M.evaluate_single_edits(vlm, cps, base, edits)
    assert all(r["reliability"] == 1.0 and r["efficacy"] > u["efficacy"] for r, u in zip(rows, unedited))
    s = M.summarise(rows)
    assert s["all"]["cases"] == 3 and s["counterfactual"]["cases"] == 2 and s["insertion"]["cases"] == 1
    assert abs(s["all"]["evqa_mean"] - sum(s["all"][k] for k in M.EVQA) / 5) < 1e-12
    assert "modal_generality_heldout" in s["all"]


def test_specificity_panel_leaves_out_the_edited_entity(vlm, world_dir, test_cases):
    px = M.PixelCache(vlm, world_dir)
    panel = M.specificity_panel(vlm, world_dir, px, 200)
    case = test_cases[0]
    cp = M.case_prompts(vlm, case, px)
    base = M.baseline(vlm, [cp], panel)
    same = sum(e == case["entity"] for e, _ in panel)
    assert same > 0, "the panel should include questions about the entity to exclude"
    row = M.score_case(vlm, cp, 0, base)
    others = [ok for (e, _), ok in zip(panel, base.panel_correct) if e != case["entity"]]
    assert row["specificity_before"] == sum(others) / len(others)
