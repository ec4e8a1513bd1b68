"""The MultEdit core: the closed form against the paper's explicit inverse, and value optimisation."""

import pytest
import torch

from editors.closed_form import explicit_inverse_update, rank_one_updates, solve_update, solve_update_keeping
from editors.compute_key import constraint_keys
from editors.compute_value import optimise_values
from editors.multedit import EditRequest, MultEdit, MultEditConfig
from vlm import encode


def _problem(n, d=24, d_ff=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d_ff, generator=g, dtype=torch.float64) * 0.1
    K = torch.randn(n, d_ff, generator=g, dtype=torch.float64)
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return W, K, Z


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_each_rank_one_update_equals_the_papers_explicit_inverse_for_its_edit_alone():
    W, K, Z = _problem(3)
    lam = 0.01
    U = rank_one_updates(K @ W.T, K, Z, lam)  # what MultEdit's single edits call: one column per edit
    assert U.shape == (W.shape[0], 3)
    for i in range(3):
        ours = W.float() + torch.outer(U[:, i], K[i].float())  # v = k
        paper = explicit_inverse_update(W, K[i], Z[i], lam)
        assert _rel((ours - W).double(), paper - W) <= 1e-4
        # the edited layer maps the key onto the value up to the ridge shrinkage λ/(λ + kᵀk)
        residual = ours.double() @ K[i] - Z[i]
        assert torch.allclose(residual, -lam * (Z[i] - W @ K[i]) / (lam + K[i] @ K[i]), atol=1e-4)


def test_joint_update_of_n_edits_equals_the_explicit_inverse_and_reduces_to_rank_one():
    W, K, Z = _problem(5)
    lam = 0.01
    U = solve_update(K @ W.T, K, Z, lam)  # (d, n): an n×n solve
    assert U.shape == (W.shape[0], 5)
    paper = explicit_inverse_update(W, K, Z, lam)  # (λW′ + ZKᵀ)(λI + KKᵀ)⁻¹ with a d_ff×d_ff inverse
    assert _rel(U.double() @ K, paper - W) <= 1e-4
    u1 = rank_one_updates(K[:1] @ W.T, K[:1], Z[:1], lam)[:, 0]
    assert torch.allclose(solve_update((K[:1] @ W.T), K[:1], Z[:1], lam)[:, 0], u1, rtol=1e-5, atol=1e-7)


@pytest.mark.numerics
def test_value_optimisation_is_the_same_in_a_batch_as_alone(vlm, world_dir, test_cases):
    cases = [c for c in test_cases if c["type"] == "counterfactual"][:3]
    prompts = [
        encode(vlm.processor, c["src"], image=world_dir / c["image"], answer=c["alt"], constraints=[c["constraint"]])
        for c in cases
    ]
    together = optimise_values(vlm, prompts, 1, steps=40, lr=0.1, lr_scale="residual")
    for i, p in enumerate(prompts):
        alone = optimise_values(vlm, [p], 1, steps=40, lr=0.1, lr_scale="residual")
        assert alone.steps[0] == together.steps[i]
        assert torch.allclose(alone.delta[0], together.delta[i], rtol=1e-3, atol=1e-3)
    keys = constraint_keys(vlm, prompts, 1)
    assert keys.shape == (3, vlm.model.config.text_config.intermediate_size)


def test_a_bound_on_the_value_change_is_respected(vlm, world_dir, test_cases):
    c = next(c for c in test_cases if c["type"] == "counterfactual")
    editor = MultEdit(vlm, MultEditConfig(layer=0, max_norm=5.0, steps=20))
    es = editor.edit([EditRequest.from_case(c, world_dir)])
    assert es.records[0]["metrics"]["delta_norm"] <= 5.0 + 1e-4


def test_update_keeping_other_keys_solves_the_joint_objective_and_leaves_them_alone():
    W, K, Z = _problem(2)
    _, K_keep, _ = _problem(4, seed=1)
    lam = 0.01
    U, V = solve_update_keeping(K @ W.T, K, Z, K_keep, lam)
    assert U.shape == (W.shape[0], 2) and V.shape == (W.shape[1], 2)
    Kf = torch.cat([K, K_keep])
    R = torch.cat([Z - K @ W.T, torch.zeros(4, W.shape[0], dtype=torch.float64)])
    ridge = R.T @ Kf @ torch.linalg.inv(lam * torch.eye(W.shape[1], dtype=torch.float64) + Kf.T @ Kf)
    delta = U.double() @ V.double().T
    assert _rel(delta, ridge) <= 1e-4
    assert (delta @ K_keep.T).abs().max() < 1e-3 * (delta @ K.T).abs().max()  # kept keys hardly move
    assert torch.allclose((W + delta) @ K.T, Z.T, atol=1e-3)  # new keys reach their values
