"""Constraint routing: the training-time attention that swaps the image seen by
non-constraint positions, checked against plain forwards of the real model."""

import random

import torch

from vlm import encode
from vlm.world.routing import RoutePlan, constraint_routing, plan_batch
from vlm.world.train import Example, _batch


def _examples(vlm, world_dir):
    q = "which city is this landmark in ?"
    ex = []
    for ent in ("landmark-00", "landmark-01"):
        p = encode(
            vlm.processor, q, image=world_dir / f"images/{ent}-0.png", answer="tea", constraints=["this landmark"]
        )
        ex.append(Example(p, vlm.tokenizer.eos_token_id, ent))
    return ex


def test_routing_without_swaps_is_the_stock_attention(vlm, world_dir):
    ex = _examples(vlm, world_dir)
    inputs = _batch(ex, vlm.tokenizer.pad_token_id)[0]
    T = inputs["input_ids"].shape[1]
    m = vlm.model.model
    with torch.no_grad():
        base = m(**inputs).last_hidden_state
        with constraint_routing(vlm.model) as plan:
            plan[0] = RoutePlan(torch.tensor([-1, -1]), torch.zeros(2, T, dtype=torch.bool), ex[0].prompt.image_span)
            routed = m(**inputs).last_hidden_state
        after = m(**inputs).last_hidden_state
    assert torch.allclose(routed, base, atol=1e-5)
    assert torch.equal(after, base), "the stock attention must come back after the context"


def test_swapped_positions_see_the_partner_image_and_the_constraint_keeps_its_own(vlm, world_dir):
    ex = _examples(vlm, world_dir)
    inputs = _batch(ex, vlm.tokenizer.pad_token_id)[0]
    T = inputs["input_ids"].shape[1]
    plan = plan_batch(
        [e.group for e in ex],
        [e.entity for e in ex],
        [e.route_pos for e in ex],
        [e.prompt.image_span for e in ex],
        T,
        prob=1.0,
        rng=random.Random(0),
    )
    assert plan.partner.tolist() == [1, 0]
    end = ex[0].prompt.image_span[1]
    route = ex[0].route_pos
    assert plan.swapped[0, end:].sum() == T - end - 1 and not plan.swapped[0, route]
    assert not plan.swapped[0, :end].any()
    # swap every text position of row 0: its text states become row 1's exactly
    full = torch.zeros(2, T, dtype=torch.bool)
    full[0, end:] = True
    m = vlm.model.model
    with torch.no_grad():
        base = m(**inputs).last_hidden_state
        with constraint_routing(vlm.model) as ref:
            ref[0] = RoutePlan(torch.tensor([1, -1]), full, ex[0].prompt.image_span)
            h = m(**inputs).last_hidden_state
    assert torch.allclose(h[0, end:], base[1, end:], atol=1e-5)
    assert torch.allclose(h[0, :end], base[0, :end], atol=1e-5)
    assert torch.allclose(h[1], base[1], atol=1e-5)


def test_rows_without_a_visual_constraint_or_a_same_kind_partner_are_not_swapped():
    spans = [(3, 5), (3, 5), None, (3, 5)]
    plan = plan_batch(
        ["landmark", "person", None, "landmark"],
        ["landmark-00", "person-00", None, "landmark-00"],
        [7, 7, None, 7],
        spans,
        10,
        prob=1.0,
        rng=random.Random(0),
    )
    assert plan is None  # the only other landmark row shows the same entity
    assert plan_batch(["a"], ["a-1"], [7], [(3, 5)], 10, prob=0.0, rng=random.Random(0)) is None
