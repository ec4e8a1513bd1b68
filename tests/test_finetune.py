"""FT-L, the baseline: same module, same loss; batched rows are independent; its dense edit set saves,
loads, attaches and detaches like the other editors'."""

import pytest
import torch
from choosing import first_with

from editors.attach import attach
from editors.files import EditSetError, FingerprintMismatchError
from editors.finetune import FineTune, FineTuneConfig, FineTuneEditSet
from editors.multedit import EditRequest
from vlm import encode, score_answers
from vlm.hooks import hook_count
from vlm.patching import run_patched
from vlm.prompts import collate


@pytest.mark.numerics
def test_ft_l_writes_the_new_answer_and_batches_equal_single_runs(vlm, world_dir, test_cases, tmp_path):
    ft = FineTune(vlm, FineTuneConfig(layer=0, steps=60))

    def answers_alone(case) -> bool:  # the first two cases whose edit alone answers (tests/choosing.py)
        req = EditRequest.from_case(case, world_dir)
        with attach(vlm, ft.edit_each([req], batch_size=1)[0]):
            return score_answers(vlm, [ft.encode(req)])[0].exact

    cf = [c for c in test_cases if c["type"] == "counterfactual"]
    cases = first_with(cf, answers_alone, 2, "are answered after their own FT-L edit")
    reqs = [EditRequest.from_case(c, world_dir) for c in cases]
    both = ft.edit_each(reqs, batch_size=2)
    for r, es in zip(reqs, both):
        assert es.num_edits == 1 and es.deltas[0].W.shape == tuple(vlm.module(ft.module).weight.shape)
        assert es.records[0]["metrics"]["p_after"] > es.records[0]["metrics"]["p_before"]
        with attach(vlm, es):  # edited in a batch of two, as alone
            assert score_answers(vlm, [ft.encode(r)])[0].exact
    alone = ft.edit_each(reqs[:1], batch_size=1)[0]
    assert torch.allclose(alone.deltas[0].W, both[0].deltas[0].W, atol=1e-4)
    bounded = FineTune(vlm, FineTuneConfig(layer=0, steps=5, max_change=1e-3)).edit_each(reqs[:1])[0]
    assert bounded.deltas[0].W.abs().max() <= 1e-3 + 1e-9
    seq = ft.edit_sequentially(reqs)
    assert len(seq.deltas) == 1 and seq.num_edits == 2 and seq.deltas[0].W.abs().sum() > 0

    # the file: a round trip gives the same edits; attaching and removing leaves the model as it was
    path = tmp_path / "ft.safetensors"
    seq.save(path)
    back = FineTuneEditSet.load(path, vlm)
    assert torch.equal(back.deltas[0].W, seq.deltas[0].W) and back.records == seq.records
    prompt = encode(vlm.processor, cases[0]["src"], image=world_dir / cases[0]["image"])
    before = run_patched(vlm, collate([prompt], vlm.tokenizer.pad_token_id)).hidden
    with attach(vlm, back):
        changed = run_patched(vlm, collate([prompt], vlm.tokenizer.pad_token_id)).hidden
    after = run_patched(vlm, collate([prompt], vlm.tokenizer.pad_token_id)).hidden
    assert not torch.equal(before, changed) and torch.equal(before, after) and hook_count(vlm.model) == 0

    other = FineTuneEditSet(back.deltas, "0" * 32, records=back.records)
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(FingerprintMismatchError):
        FineTuneEditSet.load(tmp_path / "other.safetensors", vlm)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(EditSetError, match="truncated or corrupt"):
        FineTuneEditSet.load(tmp_path / "bad.safetensors")
