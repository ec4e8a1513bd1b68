"""VisEdit: the adapter's algebra and hooks, the edit-set file, exact removal, training that resumes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from editors.attach import attach
from editors.edit_set import EditSetError, FingerprintMismatchError
from editors.request import EditRequest
from editors.visedit import VEAD, AttachedVEAD, EditSignal, SignalBatch, VEADConfig, VisEdit, VisEditSet
from editors.visedit.adapter import unit_rms
from editors.visedit.train import Trainer, VisEditTrainConfig
from vlm import collate, encode, run_patched


def _randomised(vlm, layer=0, signal_layer=4, seed=0) -> VEAD:
    """A VEAD whose value map is not zero (a fresh one is the identity), scaled so that it acts."""
    torch.manual_seed(seed)
    vead = VEAD(VEADConfig(hidden_size=vlm.hidden_size, layer=layer, signal_layer=signal_layer, width=32))
    with torch.no_grad():
        vead.w3.weight.normal_(0, 0.5)
    vead.eval()
    return vead


def _prompts(vlm, world_dir, test_cases):
    c = test_cases[0]
    return [
        encode(vlm.processor, c["src"], image=world_dir / c["image"]),
        encode(vlm.processor, c["loc"]),
        encode(vlm.processor, c["m_loc_q"], image=world_dir / c["m_loc"]),
    ]


def _logits(vlm, prompts):
    run = run_patched(vlm, collate(prompts, vlm.tokenizer.pad_token_id))
    return run.logits_at(list(range(len(prompts))), [p.length - 1 for p in prompts])


@pytest.fixture(scope="module")
def adapter_set(vlm, world_dir, test_cases):
    vead = _randomised(vlm)
    es = VisEditSet(vead, vlm.fingerprint, training={"note": "random weights for tests"})
    editor = VisEdit(vlm, es)
    return editor.edit([EditRequest.from_case(test_cases[0], world_dir)])


def test_serving_form_is_the_sum_of_each_edits_gated_contribution(vlm):
    vead = _randomised(vlm)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 16, vlm.hidden_size, generator=g) * 50
    signals = [
        EditSignal(torch.randn(n, vlm.hidden_size, generator=g), torch.randn(vlm.hidden_size, generator=g))
        for n in (7, 11, 5)
    ]
    with torch.no_grad():
        together = vead.all_edits(h, vead.prepare(SignalBatch(signals)))
        expected = h.clone()
        for s in signals:  # one edit at a time, in the paired (training) form
            one = SignalBatch([s, s])
            new, logits = vead.paired(h, one)
            expected += new - h
            assert torch.allclose(
                new - h, (new - h) / torch.sigmoid(logits)[..., None] * torch.sigmoid(logits)[..., None], atol=1e-5
            )
    assert torch.allclose(together, expected, atol=1e-4)


def test_influence_mapper_is_sigmoid_of_f1_dot_f2(vlm):
    import math

    vead = _randomised(vlm)
    h = torch.randn(16, vlm.hidden_size) * 30
    last = torch.randn(vlm.hidden_size)
    with torch.no_grad():
        c = torch.sigmoid(vead.influence_logits(h, vead.f2(unit_rms(last))))
        manual = torch.sigmoid(vead.f1(unit_rms(h)) @ vead.f2(unit_rms(last)) / math.sqrt(vead.config.width))
    assert torch.allclose(c, manual, atol=1e-6) and c.shape == (16,)


def test_a_fresh_adapter_is_the_identity_and_an_edit_changes_only_visual_states(vlm, world_dir, test_cases):
    prompts = _prompts(vlm, world_dir, test_cases)
    base = _logits(vlm, prompts)
    fresh = VEAD(VEADConfig(hidden_size=vlm.hidden_size, layer=1, signal_layer=4, width=32))
    sig = EditSignal(torch.randn(30, vlm.hidden_size), torch.randn(vlm.hidden_size))
    with AttachedVEAD(vlm, fresh, SignalBatch([sig])):
        assert torch.equal(_logits(vlm, prompts), base)
    vead = _randomised(vlm, layer=1)
    seen = {}
    layer = vlm.module(vlm.arch.layer_path(1))

    def spy(_mod, args, kwargs):
        seen["h"] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone()

    inputs = collate(prompts[:1], vlm.tokenizer.pad_token_id)
    handle = layer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        run_patched(vlm, inputs)
        before = seen["h"]
    finally:
        handle.remove()
    with AttachedVEAD(vlm, vead, SignalBatch([sig])):
        handle = layer.register_forward_pre_hook(spy, with_kwargs=True)  # after the adapter's own hook
        try:
            run_patched(vlm, inputs)
        finally:
            handle.remove()
    after = seen["h"]
    changed = (after - before).abs().sum(-1)[0] > 0
    img = torch.zeros_like(changed)
    img[list(range(*prompts[0].image_span))] = True
    assert torch.equal(changed, img), "only the image positions' states change"


def test_apply_and_remove_is_bit_identical(vlm, world_dir, test_cases, adapter_set):
    prompts = _prompts(vlm, world_dir, test_cases)
    state = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    base = _logits(vlm, prompts)
    with attach(vlm, adapter_set):
        edited = _logits(vlm, prompts)
    after = _logits(vlm, prompts)
    assert not torch.equal(edited[0], base[0]), "the edit acts on its image question"
    assert torch.equal(edited[1], base[1]), "a text-only question has no visual state to change"
    assert torch.equal(after, base), "removal gives back the base model bit for bit"
    assert all(torch.equal(v, state[k]) for k, v in vlm.model.state_dict().items())


def test_edit_set_round_trip(vlm, adapter_set, tmp_path):
    path = tmp_path / "v.safetensors"
    adapter_set.save(path)
    back = VisEditSet.load(path, vlm)
    assert back.num_edits == 1 and back.config == adapter_set.config
    assert torch.equal(back.signals[0].states, adapter_set.signals[0].states.float())
    assert all(
        torch.equal(a, b) for a, b in zip(back.vead.state_dict().values(), adapter_set.vead.state_dict().values())
    )
    assert back.records == json.loads(json.dumps(adapter_set.records))
    assert back.records[0]["editor"] == "visedit" and "p_after" in back.records[0]["metrics"]


def _rewrite(src, dst, change_meta=None, change_tensors=None):
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    if change_meta:
        man = json.loads(meta["editlens"])
        change_meta(man)
        meta["editlens"] = json.dumps(man)
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, str(dst), metadata=meta)


@pytest.mark.parametrize(
    "what, expect",
    [
        ("truncated", "not a readable safetensors"),
        ("foreign", "fingerprint"),
        ("shape", "shape"),
        ("nan", "NaN"),
        ("weights", "sha256"),
        ("missing", "missing"),
        ("multedit-file", "not a VisEdit edit set"),
    ],
)
def test_corrupted_or_foreign_files_are_refused(vlm, adapter_set, tmp_path, what, expect, world_dir, test_cases):
    good = tmp_path / "good.safetensors"
    adapter_set.save(good)
    bad = tmp_path / "bad.safetensors"
    if what == "truncated":
        bad.write_bytes(good.read_bytes()[:-100])
    elif what == "foreign":
        _rewrite(good, bad, change_meta=lambda m: m.update(base_fingerprint="0" * 32))
    elif what == "shape":
        _rewrite(good, bad, change_tensors=lambda t: t.update({"vead.w1.weight": torch.zeros(3, 3)}))
    elif what == "nan":
        _rewrite(good, bad, change_tensors=lambda t: t["signal.0.last"].__setitem__(0, float("nan")))
    elif what == "weights":
        _rewrite(good, bad, change_tensors=lambda t: t["vead.w3.bias"].add_(1.0))
    elif what == "missing":
        _rewrite(good, bad, change_tensors=lambda t: t.pop("vead.f1.0.weight"))
    else:
        from editors.multedit import MultEdit, MultEditConfig

        MultEdit(vlm, MultEditConfig(layer=0, steps=2)).edit([EditRequest.from_case(test_cases[0], world_dir)]).save(
            bad
        )
    error = FingerprintMismatchError if what == "foreign" else EditSetError
    with pytest.raises(error, match=expect):
        VisEditSet.load(bad, vlm)


def _tiny_config(**kw):
    base = {
        "layer": 0,
        "signal_layer": 4,
        "attribution_layers": [4],
        "width": 16,
        "steps": 4,
        "batch_size": 2,
        "per_entity": 2,
        "validation_samples": 2,
        "eval_every": 2,
        "checkpoint_every": 2,
        "im_tokens": 4,
        "lr": 1e-2,
    }
    base.update(kw)
    return VisEditTrainConfig(**base)


@pytest.mark.numerics
@pytest.mark.slow
def test_training_resumes_exactly_where_it_stopped(vlm, world_dir, tmp_path):
    straight = Trainer(vlm, world_dir, tmp_path / "a", _tiny_config()).run()
    Trainer(vlm, world_dir, tmp_path / "b", _tiny_config(steps=2)).run()  # interrupted after 2 steps
    events = []
    resumed = Trainer(vlm, world_dir, tmp_path / "b", _tiny_config(), progress=events.append).run()
    assert any("resumed at step 2" in e.message for e in events)
    assert straight["steps"] == resumed["steps"] == 4
    a = VisEditSet.load(tmp_path / "a" / "adapter.safetensors", vlm)
    b = VisEditSet.load(tmp_path / "b" / "adapter.safetensors", vlm)
    assert all(
        torch.allclose(x, y, atol=1e-6) for x, y in zip(a.vead.state_dict().values(), b.vead.state_dict().values())
    )
    log = json.loads((tmp_path / "b" / "training.json").read_text())
    assert [r["step"] for r in log["curve"]] == [1, 2, 3, 4]
    assert {"rel", "gen", "loc", "im_up", "im_down", "im_attr"} <= set(log["curve"][0])
    with pytest.raises(ValueError, match="other settings"):
        Trainer(vlm, world_dir, tmp_path / "b", _tiny_config(lr=0.5, steps=6)).run()


def test_the_trained_form_multi_head_image_key_round_trips_and_acts(vlm, world_dir, test_cases, tmp_path):
    """The form `editlens visedit train` makes (4 heads, the mapper keyed by the edit image, f1 with the
    image's mean state): a saved edit set loads back to the same outputs and removes exactly."""
    torch.manual_seed(3)
    cfg = VEADConfig(
        hidden_size=vlm.hidden_size,
        layer=0,
        signal_layer=0,
        width=32,
        heads=4,
        summary_token="image",
        mapper_context=True,
    )
    vead = VEAD(cfg)
    with torch.no_grad():
        vead.wo.weight.normal_(0, 0.5)
    vead.eval()
    es = VisEdit(vlm, VisEditSet(vead, vlm.fingerprint)).edit([EditRequest.from_case(test_cases[1], world_dir)])
    assert es.signals[0].last.shape == (1, vlm.hidden_size)  # the mean of the edit image's rows is the key
    es.save(tmp_path / "v.safetensors")
    back = VisEditSet.load(tmp_path / "v.safetensors", vlm)
    assert back.config == cfg
    prompts = _prompts(vlm, world_dir, test_cases)
    base = _logits(vlm, prompts)
    with attach(vlm, es):
        a = _logits(vlm, prompts)
    with attach(vlm, back):
        b = _logits(vlm, prompts)
    assert torch.allclose(a, b, atol=1e-5) and not torch.equal(a, base)
    assert torch.equal(_logits(vlm, prompts), base)


def test_influence_map_cli_draws_the_mapper_and_summarises_it(vlm, world_dir, test_cases, tmp_path):
    """`editlens visedit influence-map`: the figure, C per visual token on three images, and with --cases the
    mean C per image kind over that many cases (for one case: the figure's own means)."""
    from typer.testing import CliRunner

    from client.cli import app

    torch.manual_seed(5)
    cfg = VEADConfig(
        hidden_size=vlm.hidden_size,
        layer=0,
        signal_layer=0,
        width=32,
        heads=4,
        summary_token="image",
        mapper_context=True,
    )
    vead = VEAD(cfg)
    with torch.no_grad():
        vead.f1[0].weight.normal_(0, 1.0)
    VisEditSet(vead.eval(), vlm.fingerprint).save(tmp_path / "adapter.safetensors")
    runner = CliRunner()
    args = [
        "visedit",
        "influence-map",
        "--world",
        str(world_dir),
        "--adapter",
        str(tmp_path / "adapter.safetensors"),
        "--out",
        str(tmp_path / "im.png"),
        "--device",
        "cpu",
    ]
    res = runner.invoke(app, [*args, "--cases", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (tmp_path / "im.png").read_bytes()[:4] == b"\x89PNG" and out["case"] == test_cases[0]["case_id"]
    panels = out["panels"]
    assert [len(p["scores"]) for p in panels] == [16, 16, 16]
    assert all(0.0 <= v <= 1.0 for p in panels for v in p["scores"])
    s = out["summary"]
    assert s["cases"] == 1
    assert s["mean_c_edit_image"] == pytest.approx(panels[0]["mean"])
    assert s["mean_c_unrelated_image"] == pytest.approx(panels[2]["mean"])
    assert s["separated_edit_image"] == float(panels[0]["mean"] > panels[2]["mean"])
    res = runner.invoke(app, [*args, "--cases", "-1"])
    assert res.exit_code != 0 and "--cases must be 0 or more" in res.output
    res = runner.invoke(app, [*args, "--case", "no-such-case"])
    assert res.exit_code != 0 and "no test case" in res.output


def test_train_cli_refuses_bad_settings_with_a_message(world_dir, tmp_path):
    from typer.testing import CliRunner

    from client.cli import app

    runner = CliRunner()
    base = ["visedit", "train", "--world", str(world_dir), "--out", str(tmp_path / "t"), "--device", "cpu"]
    res = runner.invoke(app, [*base, "--no-mapper-tied", "--heads", "3"])  # 3 heads do not divide the width
    assert res.exit_code == 2 and "heads must divide" in res.output
    res = runner.invoke(app, [*base, "--steps", "0"])
    assert res.exit_code != 0 and "steps must be at least 1" in res.output
    assert not (tmp_path / "t" / "adapter.safetensors").exists()


@pytest.mark.slow
def test_the_attribution_noise_seed_is_the_same_in_every_process():
    """Training must repeat under a fixed seed: the per-sample noise seed may not depend on PYTHONHASHSEED."""
    import os
    import subprocess
    import sys

    from editors.visedit.train import stable_seed

    code = "from editors.visedit.train import stable_seed; print(stable_seed(('which city ?', 'images/a.png')))"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(h)},
        ).stdout.strip()
        for h in (1, 2)
    }
    assert seen == {str(stable_seed(("which city ?", "images/a.png")))}
