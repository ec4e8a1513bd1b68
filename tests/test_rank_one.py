"""The MultEdit core: the closed form, exact undo, and value optimisation."""

import torch

from editors.rank_one import RankOne, applied, constraint_keys, optimise_values, rank_one
from vlm import collate, encode, run_patched, score_batch


def test_rank_one_is_the_ridge_solution_without_a_dff_matrix():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 10, generator=g, dtype=torch.float64)
    k = torch.randn(10, generator=g, dtype=torch.float64)
    z = torch.randn(6, generator=g, dtype=torch.float64)
    lam = 0.01
    u, v = rank_one(W, k, z, lam)
    ridge = (lam * W + torch.outer(z, k)) @ torch.linalg.inv(lam * torch.eye(10, dtype=torch.float64) + torch.outer(k, k))
    assert torch.allclose(W.float() + torch.outer(u, v), ridge.float(), atol=1e-5)
    # the edited layer maps the key onto the value up to the ridge shrinkage λ/(λ + kᵀk)
    Wf, kf, zf = W.float(), k.float(), z.float()
    residual = (Wf + torch.outer(u, v)) @ kf - zf
    assert torch.allclose(residual, -lam * (zf - Wf @ kf) / (lam + kf @ kf), atol=1e-5)
    assert residual.norm() < 1e-2 * (zf - Wf @ kf).norm()


def test_applied_updates_are_undone_bit_for_bit(vlm, world_dir):
    p = encode(vlm.processor, "which city is this landmark in ?", image=world_dir / "images/landmark-00-0.png",
               constraints=["this landmark"])
    inputs = collate([p], vlm.tokenizer.pad_token_id)
    before = run_patched(vlm, inputs).hidden.clone()
    upd = RankOne(1, torch.randn(vlm.hidden_size), torch.randn(vlm.model.config.text_config.intermediate_size))
    with applied(vlm, [upd, RankOne(1, upd.u * 0.5, upd.v)]):
        during = run_patched(vlm, inputs).hidden
    after = run_patched(vlm, inputs).hidden
    assert not torch.equal(before, during)
    assert torch.equal(before, after)


def test_an_optimised_value_written_by_the_rank_one_update_gives_the_new_answer(vlm, world_dir, test_cases):
    case = next(c for c in test_cases if c["type"] == "counterfactual")
    p = encode(vlm.processor, case["src"], image=world_dir / case["image"], answer=case["alt"],
               constraints=[case["constraint"]])
    assert not score_batch(vlm, [p])[0].exact, "the base model should not give the counterfactual answer"
    layer = 1
    k = constraint_keys(vlm, [p], layer)[0]
    z_star, delta = optimise_values(vlm, [p], layer, steps=200)
    assert delta.norm() > 0
    W = vlm.module(vlm.arch.module_path("down_proj", layer)).weight.detach()
    u, v = rank_one(W, k, z_star[0])
    with applied(vlm, [RankOne(layer, u, v)]):
        assert score_batch(vlm, [p])[0].exact
