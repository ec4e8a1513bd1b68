"""The shape of the code: imports point one way (import-linter, contracts in pyproject.toml), the code is
lint-clean (ruff), and hooks cannot leak onto the shared model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm.hooks import Hooks, hook_count

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed (it is in the test extra)"
    return found


def test_imports_point_one_way():
    res = subprocess.run(
        [_tool("lint-imports"), "--config", "pyproject.toml"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_the_cli_starts_without_torch():
    """`editlens --help` and the remote commands do not load the model libraries (the SDK alone: test_proto)."""
    code = "import sys, client.cli; bad = {'torch', 'transformers', 'mlflow'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------ hooks
def test_hooks_are_removed_when_registration_fails_half_way(vlm, monkeypatch):
    """An error while installing a patched run's hooks (here: the third module lookup fails) leaves no hook
    on the model; the server reuses its threads, so a leaked hook would act on later requests."""
    from vlm.patching import Patch, run_patched
    from vlm.prompts import collate, encode

    assert hook_count(vlm.model) == 0
    prompt = encode(vlm.processor, "which city is this landmark in ?")
    inputs = collate([prompt], vlm.tokenizer.pad_token_id)
    clean = run_patched(vlm, inputs).hidden
    real, calls = type(vlm).module, {"n": 0}

    def failing(self, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("provoked while registering")
        return real(self, path)

    monkeypatch.setattr(type(vlm), "module", failing)
    patch = Patch(0, "hidden", [1], torch.zeros(1, vlm.hidden_size), layers=[0])
    with pytest.raises(RuntimeError, match="provoked"):
        run_patched(vlm, inputs, patches=[patch], capture=[("mlp", 1), ("attn", 2), ("hidden", 3)])
    assert calls["n"] == 3
    monkeypatch.undo()
    assert hook_count(vlm.model) == 0
    assert torch.equal(run_patched(vlm, inputs).hidden, clean)


def test_attaching_edit_sets_leaves_nothing_when_one_fails(vlm):
    """``attach`` of several edit sets whose second one cannot be attached removes the first one's hooks."""
    from editors.attach import attach
    from editors.edit_set import EditSet, LowRankDelta

    module = vlm.arch.module_path("down_proj", 0)
    w = vlm.module(module).weight
    good = EditSet(
        [LowRankDelta(0, module, torch.zeros(w.shape[0], 1), torch.zeros(w.shape[1], 1))], vlm.fingerprint, "multedit"
    )
    bad = EditSet(
        [LowRankDelta(0, "model.no.such.module", torch.zeros(1, 1), torch.zeros(1, 1))], vlm.fingerprint, "multedit"
    )
    with pytest.raises(AttributeError):
        attach(vlm, good, bad)
    assert hook_count(vlm.model) == 0


def test_hooks_act_only_in_their_thread_and_go_with_the_block(vlm):
    import threading

    seen = []
    with Hooks() as hooks:
        hooks.add(vlm.module(vlm.arch.layer_path(0)), lambda mod, args, out: seen.append(threading.get_ident()))
        assert hook_count(vlm.model) == 1
        from vlm.patching import run_patched
        from vlm.prompts import collate, encode

        inputs = collate([encode(vlm.processor, "which city is this landmark in ?")], vlm.tokenizer.pad_token_id)
        t = threading.Thread(target=lambda: run_patched(vlm, inputs))
        t.start()
        t.join()
        run_patched(vlm, inputs)
    assert seen == [threading.get_ident()] and hook_count(vlm.model) == 0
