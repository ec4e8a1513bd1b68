"""KeyGate's gate decides with the edit keys first and the reference keys only where an edit key accepts a
token (issue 29 item 2): the same decisions as its definition, one scan of edits and references together, on
the tokens of real prompts (the edited one opens it, others do not) and on random inputs; and the bench that
times the two runs and reports both against the base model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from client.cli import app
from editors import get_editor
from editors.request import EditRequest
from vlm.patching import run_patched
from vlm.prompts import collate, encode


@pytest.mark.numerics
def test_edits_first_decides_exactly_as_the_joint_scan(vlm, world_dir, test_cases):
    spec = get_editor("keygate")
    cases = test_cases[:3]
    es = spec.create(vlm, spec.config(vlm, layer=0)).edit_sequentially(
        [EditRequest.from_case(c, world_dir) for c in cases]
    )
    gate = es.gates[0]
    prompts = [encode(vlm.processor, c["src"], image=world_dir / c["image"]) for c in test_cases[:8]]
    run = run_patched(vlm, collate(prompts, vlm.tokenizer.pad_token_id), capture=[("mlp_in", 0)])
    x = run.captured[("mlp_in", 0)]
    fast, fast_idx = gate.firing(x)
    joint, joint_idx = gate.firing_joint(x)
    assert torch.equal(fast, joint) and torch.equal(fast_idx[fast], joint_idx[joint])
    assert fast.any() and not fast.all()  # the edited prompts open it somewhere, the rest of the tokens not
    noise = gate.mean + torch.randn(500, x.shape[-1], generator=torch.Generator().manual_seed(0)) * x.std()
    assert torch.equal(gate.firing(noise)[0], gate.firing_joint(noise)[0])


@pytest.mark.slow
def test_bench_gate_reports_both_rules_against_the_base_model(world_dir):
    res = CliRunner().invoke(
        app, ["bench", "gate", "--world", str(world_dir), "--edits", "1", "--edits", "50", "--rounds", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [r["edit_keys"] for r in out["rows"]] == [1, 50] and out["reference_keys"] > 0
    for row in out["rows"]:
        assert row["base_ms"] > 0 and row["joint_ratio"] > 0 and row["edits_first_ratio"] > 0
