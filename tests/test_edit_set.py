"""The edit-set file: round trip, exact undo, and refusal of foreign or broken files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from editors.attach import attach
from editors.edit_set import EditSet, EditSetError, FingerprintMismatchError, LowRankDelta
from editors.multedit import EditRequest, MultEdit, MultEditConfig
from vlm import collate, encode, run_patched


@pytest.fixture(scope="module")
def edit_set(vlm, world_dir, test_cases):
    cases = [c for c in test_cases if c["type"] == "counterfactual"][:2]
    editor = MultEdit(vlm, MultEditConfig(layer=1, steps=30))
    es = editor.edit([EditRequest.from_case(cases[0], world_dir)])
    return MultEdit(vlm, MultEditConfig(layer=2, steps=30)).edit([EditRequest.from_case(cases[1], world_dir)], onto=es)


def _outputs(vlm, world_dir, test_cases):
    c = test_cases[0]
    prompts = [
        encode(vlm.processor, c["src"], image=world_dir / c["image"]),
        encode(vlm.processor, c["loc"]),
        encode(vlm.processor, c["m_loc_q"], image=world_dir / c["m_loc"]),
    ]
    run = run_patched(vlm, collate(prompts, vlm.tokenizer.pad_token_id))
    return run.logits_at([0, 1, 2], [p.length - 1 for p in prompts]), run.hidden


def test_round_trip_keeps_factors_and_manifest(vlm, edit_set, tmp_path):
    path = tmp_path / "e.safetensors"
    size = edit_set.save(path)
    assert size == path.stat().st_size
    assert size / edit_set.num_edits < 8 * (vlm.hidden_size + 512) + 4096, "a few KB per edit, not a weight copy"
    back = EditSet.load(path, vlm)
    assert back.num_edits == 2 and [d.layer for d in back.deltas] == [1, 2]
    for a, b in zip(edit_set.deltas, back.deltas):
        assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V) and a.module == b.module
    assert back.records == json.loads(json.dumps(edit_set.records))
    assert back.hyperparameters["lr_scale"] == "residual"


def test_attach_then_remove_is_bit_identical_to_the_base_model(vlm, world_dir, test_cases, edit_set):
    before = _outputs(vlm, world_dir, test_cases)
    with attach(vlm, edit_set):
        during = _outputs(vlm, world_dir, test_cases)
    after = _outputs(vlm, world_dir, test_cases)
    assert not torch.equal(before[1], during[1])
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    weights = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    h = attach(vlm, edit_set)
    h.remove()
    assert all(torch.equal(weights[k], v) for k, v in vlm.model.state_dict().items()), "base weights untouched"


def _rewrite(src, dst, tensors=None, manifest=None):
    t = load_file(str(src))
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        man = json.loads(f.metadata()["editlens"])
    if tensors:
        t.update(tensors)
    if manifest:
        man.update(manifest)
    save_file(t, str(dst), metadata={"editlens": json.dumps(man)})
    return dst


def test_foreign_and_broken_files_are_refused_with_clear_errors(vlm, edit_set, tmp_path):
    good = tmp_path / "good.safetensors"
    edit_set.save(good)
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        EditSet.load(_rewrite(good, tmp_path / "fp.safetensors", manifest={"base_fingerprint": "0" * 32}), vlm)
    # the right rank and manifest, the wrong width for the module
    U = load_file(str(good))["delta.0.U"]
    bad_shape = _rewrite(
        good,
        tmp_path / "shape.safetensors",
        manifest={
            "deltas": [
                {"layer": 1, "module": edit_set.deltas[0].module, "rank": 1, "shape": [U.shape[0], 7]},
                json.loads(json.dumps(EditSet.manifest(edit_set)["deltas"][1])),
            ]
        },
        tensors={"delta.0.V": torch.ones(7, 1)},
    )
    with pytest.raises(EditSetError, match="weight shape"):
        EditSet.load(bad_shape, vlm)
    nan = _rewrite(good, tmp_path / "nan.safetensors", tensors={"delta.0.U": torch.full_like(U, float("nan"))})
    with pytest.raises(EditSetError, match="NaN"):
        EditSet.load(nan)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 100])
    with pytest.raises(EditSetError, match="truncated or corrupt"):
        EditSet.load(trunc)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(EditSetError, match="not an edit set"):
        EditSet.load(plain)
    with pytest.raises(EditSetError, match="not found"):
        EditSet.load(tmp_path / "missing.safetensors")
    rank = _rewrite(good, tmp_path / "rank.safetensors", tensors={"delta.0.U": torch.ones(U.shape[0], 2)})
    with pytest.raises(EditSetError, match="rank"):
        EditSet.load(rank)
    with pytest.raises(EditSetError, match="NaN"):
        EditSet(
            [LowRankDelta(1, "m", torch.full((2, 1), float("inf")), torch.ones(3, 1))], "f", "multedit", records=[{}]
        ).save(tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_attached_edits_act_only_in_their_own_thread(vlm, edit_set, world_dir, test_cases):
    """The server serves several versions at once from one model: an edit set attached in one
    thread must not change a forward pass running in another."""
    import threading

    base, _ = _outputs(vlm, world_dir, test_cases)
    seen = {}
    attached, release = threading.Event(), threading.Event()

    def editing_thread():
        with attach(vlm, edit_set):
            seen["edited"] = _outputs(vlm, world_dir, test_cases)[0]
            attached.set()
            release.wait(30)

    t = threading.Thread(target=editing_thread)
    t.start()
    assert attached.wait(60)
    try:
        assert torch.equal(_outputs(vlm, world_dir, test_cases)[0], base)  # this thread: the base model
    finally:
        release.set()
        t.join()
    assert not torch.equal(seen["edited"], base)  # that thread: the edited model
