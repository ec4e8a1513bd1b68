"""VisEdit's scope gate: calibrated threshold, out-of-scope inputs are the base model bit for bit, in-scope
inputs get their edits only, the file keeps the gate, and the CLI calibrates and removes it."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from editors.attach import attach
from editors.edit_set import EditSetError
from editors.request import EditRequest
from editors.visedit import VEAD, EditSignal, VEADConfig, VisEdit, VisEditSet
from editors.visedit.calibration import keys_of_images
from editors.visedit.scope import Scope, calibrate
from vlm import collate, encode, run_patched
from vlm.images import load_image


def _vead(vlm) -> VEAD:
    torch.manual_seed(0)
    vead = VEAD(VEADConfig(hidden_size=vlm.hidden_size, layer=0, signal_layer=0, width=32))
    with torch.no_grad():
        vead.w3.weight.normal_(0, 0.5)
    return vead.eval()


def _logits(vlm, prompts):
    run = run_patched(vlm, collate(prompts, vlm.tokenizer.pad_token_id))
    return run.logits_at(list(range(len(prompts))), [p.length - 1 for p in prompts])


def _far_apart(vlm, vead, world_dir, cases):
    """A test case and an image of another subject whose scope key is far from its edit image's."""
    case = cases[0]
    key = keys_of_images(vlm, vead, [load_image(world_dir / case["image"])])[0]
    others = sorted({c["m_loc"] for c in cases if c["entity"] != case["entity"]})
    keys = keys_of_images(vlm, vead, [load_image(world_dir / p) for p in others])
    cos = keys @ key
    return case, key, others[int(cos.argmin())], float(cos.min())


@pytest.fixture(scope="module")
def gated(vlm, world_dir, test_cases):
    vead = _vead(vlm)
    case, key, far_image, far_cos = _far_apart(vlm, vead, world_dir, test_cases)
    threshold = (1.0 + far_cos) / 2  # the edit image (cosine 1) is in scope, the far image is not
    scope = Scope(threshold, torch.zeros(0, key.shape[0]), [], 1e-3, {"note": "threshold set by the test"})
    trained = VisEditSet(vead, vlm.fingerprint, scope=scope)
    edited = VisEdit(vlm, trained).edit([EditRequest.from_case(case, world_dir)])
    return edited, case, far_image


@pytest.mark.numerics
def test_calibration_meets_the_target_false_accept_rate_and_reports_recall():
    g = torch.Generator().manual_seed(0)
    negatives = torch.rand(100_000, generator=g) * 1.6 - 0.8  # uniform on [-0.8, 0.8]
    positives = torch.rand(1000, generator=g) * 0.5 + 0.5  # uniform on [0.5, 1.0]
    tau, report = calibrate(positives, negatives, 1e-3)
    assert float((negatives >= tau).double().mean()) <= 1e-3
    assert tau == pytest.approx(0.8 - 1.6e-3, abs=2e-3)  # the 99.9th percentile of the negatives
    assert report["recall"] == pytest.approx(float((positives >= tau).double().mean()), abs=1e-4)
    assert set(report["levels"]) == {"0.01", "0.001", "0.0001"}
    assert report["levels"]["0.01"]["recall"] >= report["levels"]["0.0001"]["recall"]
    with pytest.raises(ValueError, match="false-accept rate"):
        calibrate(positives, negatives, 0.0)


def test_an_input_out_of_every_scope_is_the_base_model_bit_for_bit(vlm, world_dir, gated):
    edited, case, far_image = gated
    out = encode(vlm.processor, case["m_loc_q"], image=world_dir / far_image)
    inside = encode(vlm.processor, case["src"], image=world_dir / case["image"])
    text = encode(vlm.processor, case["loc"])
    base = _logits(vlm, [out, inside, text])
    alone = _logits(vlm, [out])
    with edited.attach(vlm) as att:
        only_out = _logits(vlm, [out])
        assert not bool(att.selected.any()), "the unrelated image is in no edit's scope"
        mixed = _logits(vlm, [out, inside, text])
        assert att.selected.tolist() == [[False], [True]], "one row per image row, the edit image in scope"
    assert torch.equal(only_out, alone), "nothing in scope: the pass is the base model's"
    assert torch.equal(mixed[0], base[0]), "the out-of-scope row of a mixed batch keeps the base logits"
    assert torch.equal(mixed[2], base[2]), "a text-only row has nothing to change"
    assert not torch.equal(mixed[1], base[1]), "the edit acts on its own image"
    assert torch.equal(_logits(vlm, [out, inside, text]), base), "removal gives back the base model"


def test_many_live_edits_run_only_the_ones_in_scope(vlm, world_dir, gated):
    """999 edits whose keys no image is near, and the real one: an input in its scope gets exactly its edit."""
    edited, case, far_image = gated
    sig = edited.signals[0]
    g = torch.Generator().manual_seed(3)
    far = -sig.key  # cosine -1 with the edit image's key: no image of the test is within the threshold of these
    filler = [EditSignal(sig.states + torch.randn(sig.states.shape, generator=g), sig.last, far) for _ in range(999)]
    many = edited.with_edits(filler, [{} for _ in filler])
    inside = encode(vlm.processor, case["src"], image=world_dir / case["image"])
    out = encode(vlm.processor, case["m_loc_q"], image=world_dir / far_image)
    with attach(vlm, edited):
        one = _logits(vlm, [inside, out])
    with many.attach(vlm) as att:
        got = _logits(vlm, [inside, out])
        assert att.selected.shape == (2, 1000) and att.selected.sum().item() == 1 and att.selected[0, 0]
    assert torch.equal(got, one), "the 999 edits out of scope change nothing"


def test_a_gated_edit_set_round_trips_and_bad_gates_are_refused(vlm, gated, tmp_path):
    edited, _, _ = gated
    path = tmp_path / "g.safetensors"
    edited.save(path)
    back = VisEditSet.load(path, vlm)
    assert back.scope is not None and back.scope.threshold == edited.scope.threshold
    assert torch.equal(back.signals[0].key, edited.signals[0].key)
    assert back.describe()["scope"]["threshold"] == round(edited.scope.threshold, 6)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    no_key = {k: v for k, v in tensors.items() if k != "signal.0.key"}
    save_file(no_key, str(tmp_path / "nokey.safetensors"), metadata=meta)
    with pytest.raises(EditSetError, match="no scope key"):
        VisEditSet.load(tmp_path / "nokey.safetensors")
    no_ref = {k: v for k, v in tensors.items() if k != "scope.reference"}
    save_file(no_ref, str(tmp_path / "noref.safetensors"), metadata=meta)
    with pytest.raises(EditSetError, match="reference keys are missing"):
        VisEditSet.load(tmp_path / "noref.safetensors")
    man = json.loads(meta["editlens"])
    man["adapter"]["scope"]["threshold"] = 3.0
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"editlens": json.dumps(man)})
    with pytest.raises(EditSetError, match="cosine threshold"):
        VisEditSet.load(tmp_path / "bad.safetensors")


def test_an_ungated_version_1_file_is_still_read(vlm, gated, tmp_path):
    edited, _, _ = gated
    old = edited.with_scope(None)
    tensors = old.tensors()
    man = old.manifest()
    man["format_version"] = 1
    del man["adapter"]["scope"]
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={"editlens": json.dumps(man)})
    back = VisEditSet.load(tmp_path / "v1.safetensors", vlm)
    assert back.scope is None and back.num_edits == 1


def test_calibrate_cli_gives_an_adapter_its_gate_and_removes_it(vlm, world_dir, tmp_path):
    from typer.testing import CliRunner

    from client.cli import app

    path = tmp_path / "adapter.safetensors"
    VisEditSet(_vead(vlm), vlm.fingerprint).save(path)
    run = CliRunner().invoke(
        app, ["visedit", "calibrate", "--adapter", str(path), "--far", "0.01", "--world", str(world_dir), "--json"]
    )
    assert run.exit_code == 0, run.output
    out = json.loads(run.stdout)
    assert out["scope"]["false_accept"] <= 0.01 and out["scope"]["reference_images"] > 0
    gated = VisEditSet.load(path, vlm)
    assert gated.scope is not None and gated.scope.threshold == pytest.approx(out["threshold"])
    off = CliRunner().invoke(app, ["visedit", "calibrate", "--adapter", str(path), "--off", "--world", str(world_dir)])
    assert off.exit_code == 0 and VisEditSet.load(path, vlm).scope is None
    bad = CliRunner().invoke(app, ["visedit", "calibrate", "--adapter", str(path), "--far", "2"])
    assert bad.exit_code != 0 and "false-accept rate" in bad.output


@pytest.fixture(scope="module")
def asking(vlm, world_dir, test_cases):
    """A gate that reads questions too (the world's training questions as references), one edit."""
    from editors.visedit.calibration import world_questions

    vead = _vead(vlm)
    case, key, _, far_cos = _far_apart(vlm, vead, world_dir, test_cases)
    questions, labels = world_questions(vlm, world_dir)
    scope = Scope((1.0 + far_cos) / 2, torch.zeros(0, key.shape[0]), [], 1e-3, {}, questions, labels)
    trained = VisEditSet(vead, vlm.fingerprint, scope=scope)
    return VisEdit(vlm, trained).edit([EditRequest.from_case(case, world_dir)]), case


@pytest.mark.numerics
def test_the_gate_reads_the_question_another_question_about_the_edited_image_is_left_alone(vlm, world_dir, asking):
    """The edit image asked another relation's question is the base model bit for bit; asked the edit's
    question in other words (a held-out template of its relation), the edit acts."""
    from vlm.world.spec import KIND_CONSTRAINT, RELATIONS

    edited, case = asking
    kind = next(r.kind for r in RELATIONS if r.name == case["relation"])
    own = next(r for r in RELATIONS if r.name == case["relation"])
    other = next(r for r in RELATIONS if r.kind == kind and r.name != case["relation"])
    s = KIND_CONSTRAINT[kind]
    image = world_dir / case["image"]
    asked_other = encode(vlm.processor, other.train_templates[0].format(s=s), image=image)
    reworded = encode(vlm.processor, own.heldout_templates[0].format(s=s), image=image)
    base = _logits(vlm, [asked_other, reworded])
    with edited.attach(vlm) as att:
        got = _logits(vlm, [asked_other, reworded])
        assert att.selected.tolist() == [[False], [True]]
    assert torch.equal(got[0], base[0]), "another question about the edited image keeps the base answer"
    assert not torch.equal(got[1], base[1]), "the edit's question in other words gets the edit"


def test_an_asking_gate_round_trips_with_its_question_keys(vlm, asking, tmp_path):
    edited, _ = asking
    edited.save(tmp_path / "q.safetensors")
    back = VisEditSet.load(tmp_path / "q.safetensors", vlm)
    assert back.scope.asks and back.scope.question_labels == edited.scope.question_labels
    assert torch.equal(back.signals[0].question, edited.signals[0].question)
    tensors = load_file(str(tmp_path / "q.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q.safetensors"), framework="pt") as f:
        meta = f.metadata()
    save_file({k: v for k, v in tensors.items() if k != "signal.0.question"}, str(tmp_path / "b.safetensors"), meta)
    with pytest.raises(EditSetError, match="no question key"):
        VisEditSet.load(tmp_path / "b.safetensors")


def test_text_signal_rows_drop_the_image_rows_and_still_edit(vlm, world_dir, gated):
    edited, case, _ = gated
    text_only = edited.without_edits().with_signal_rows("text")
    one = VisEdit(vlm, text_only).edit([EditRequest.from_case(case, world_dir)])
    full = edited.signals[0].states
    p = encode(vlm.processor, case["src"], answer=case["alt"], image=world_dir / case["image"])
    assert one.signals[0].states.shape[0] == full.shape[0] - len(p.image_positions)
    assert torch.equal(one.signals[0].states, torch.cat([full[: p.image_span[0]], full[p.image_span[1] :]]))
    assert one.records[0]["metrics"]["p_after"] != one.records[0]["metrics"]["p_before"]
    with pytest.raises(EditSetError, match="chosen before the first edit"):
        edited.with_signal_rows("text")
    with pytest.raises(EditSetError, match="signal rows must be one of"):
        edited.without_edits().with_signal_rows("some")


@pytest.fixture(scope="module")
def calibrated(vlm, world_dir, tmp_path_factory):
    """A (random-weight) adapter file with a scope gate calibrated on the world and text-only signals."""
    from editors.visedit.calibration import calibrate_world_scope

    adapter = tmp_path_factory.mktemp("calibrated") / "adapter.safetensors"
    trained = VisEditSet(_vead(vlm), vlm.fingerprint).with_signal_rows("text")
    trained.with_scope(calibrate_world_scope(vlm, trained.vead, world_dir, 1e-3)).save(adapter)
    return adapter


@pytest.mark.numerics
def test_gate_map_draws_the_gate_on_each_kind_of_probe(world_dir, calibrated, tmp_path):
    from typer.testing import CliRunner

    from client.cli import app

    png = tmp_path / "gate.png"
    args = ["visedit", "gate-map", "--out", str(png), "--cases", "3", "--adapter", str(calibrated)]
    res = CliRunner().invoke(app, [*args, "--world", str(world_dir), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert png.is_file() and out["cases"] == 3
    assert out["probes"]["edit image"] == {"cases": 3, "mean_cos": 1.0, "opens": 1.0}
    assert out["probes"]["unrelated image"]["opens"] == 0.0
    assert set(out["probes"]) == {
        "edit image",
        "another rendering",
        "held-out rendering",
        "unrelated image",
        "similar-looking entity",
    }


@pytest.mark.numerics
@pytest.mark.slow
def test_bench_lifelong_reports_the_gate_and_serves_the_final_version(vlm, world_dir, calibrated):
    from typer.testing import CliRunner

    from client.cli import app

    adapter = calibrated
    args = ["bench", "lifelong", "--world", str(world_dir), "--edits", "12", "--single", "0", "--panel", "20"]
    args += ["--editor", "visedit", "--set", f"visedit.adapter={adapter}", "--serve", "2", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    entry = json.loads(res.stdout)["editors"]["visedit"]
    marks = [p["edits"] for p in entry["curve"]]
    assert marks == [10, 12] and all("gate" in p for p in entry["curve"])
    gate = entry["final"]["gate"]
    assert 0 <= gate["recall"] <= 1 and gate["false_accept_reference"] == 0.0
    assert entry["final"]["modal_locality_unedited"] == 1.0, "no unrelated fact changes when the gate is closed"
    assert entry["final"]["specificity_after"] == entry["final"]["specificity_before"]
    served = entry["served"]
    assert served["requests"] == 2 and served["ratio_median_out_of_scope"] > 0 and served["version"] == 1
