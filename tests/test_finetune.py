"""FT-L, the baseline: same module, same loss; batched rows are independent."""

import torch

from editors.edit_set import attach
from editors.finetune import FineTune, FineTuneConfig
from editors.multedit import EditRequest
from vlm import score_answers


def test_ft_l_writes_the_new_answer_and_batches_equal_single_runs(vlm, world_dir, test_cases):
    cases = [c for c in test_cases if c["type"] == "counterfactual"][:2]
    reqs = [EditRequest.from_case(c, world_dir) for c in cases]
    ft = FineTune(vlm, FineTuneConfig(layer=0, steps=60))
    both = ft.edit_each(reqs, batch_size=2)
    for r, deltas in zip(reqs, both):
        assert deltas[0].W.shape == tuple(vlm.module(ft.module).weight.shape)
        with attach(vlm, deltas):
            assert score_answers(vlm, [ft.encode(r)])[0].exact
    alone = ft.edit_each(reqs[:1], batch_size=1)[0][0]
    assert torch.allclose(alone.W, both[0][0].W, atol=1e-4)
    bounded = FineTune(vlm, FineTuneConfig(layer=0, steps=5, max_change=1e-3)).edit_each(reqs[:1])[0][0]
    assert bounded.W.abs().max() <= 1e-3 + 1e-9
    seq = ft.edit_sequentially(reqs)
    assert len(seq) == 1 and seq[0].W.abs().sum() > 0
