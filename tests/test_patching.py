"""The batched activation-patching engine against plain one-at-a-time forwards."""

import torch

from vlm import Knockout, Patch, collate, encode, run_patched, score_batch


def _pair(vlm, world_dir):
    """A clean prompt (landmark-00) and a corrupted one (landmark-01's image), same tokens."""
    q = "which city is this landmark in ?"
    w = __import__("json").loads((world_dir / "world.json").read_text())
    answer = next(e for e in w["entities"] if e["id"] == "landmark-00")["facts"]["city"]
    clean = encode(
        vlm.processor, q, image=world_dir / "images/landmark-00-0.png", answer=answer, constraints=["this landmark"]
    )
    corrupt = encode(
        vlm.processor, q, image=world_dir / "images/landmark-01-0.png", answer=answer, constraints=["this landmark"]
    )
    return clean, corrupt


def _states(vlm, prompt, kinds=("hidden", "mlp", "attn", "embeds")):
    caps = [(k, -1) if k == "embeds" else (k, layer) for k in kinds for layer in range(vlm.num_layers)]
    run = run_patched(vlm, collate([prompt], vlm.tokenizer.pad_token_id), capture=set(caps))
    return {key: t[0] for key, t in run.captured.items()}


def test_restoring_every_state_reproduces_the_clean_run(vlm, world_dir):
    clean, corrupt = _pair(vlm, world_dir)
    p_clean = score_batch(vlm, [clean])[0].prob
    p_corrupt = score_batch(vlm, [corrupt])[0].prob
    assert abs(p_clean - p_corrupt) > 1e-3, "the corruption should change P(answer)"
    states = _states(vlm, clean)
    T = clean.length
    every = [Patch(0, "hidden", range(T), states[("hidden", layer)], layers=[layer]) for layer in range(vlm.num_layers)]
    restored = score_batch(vlm, [corrupt], patches=every)[0].prob
    assert abs(restored - p_clean) < 1e-5
    # the input embeddings alone (image features included) carry everything too
    emb = score_batch(vlm, [corrupt], patches=[Patch(0, "embeds", range(T), states[("embeds", -1)])])[0].prob
    assert abs(emb - p_clean) < 1e-5
    # patching nothing reproduces the corrupted run
    assert abs(score_batch(vlm, [corrupt], patches=[])[0].prob - p_corrupt) < 1e-6


def test_a_batch_of_different_patches_equals_one_forward_per_patch(vlm, world_dir):
    clean, corrupt = _pair(vlm, world_dir)
    states = _states(vlm, clean)
    c = clean.constraint_last
    a, b = clean.image_span
    specs = [
        ("hidden", [0], [c]),
        ("hidden", [2, 3, 4], [c]),
        ("mlp", [1], [c - 1, c]),
        ("attn", [0, 1], list(range(a, b))),
        ("mlp", [5], [clean.last_prompt_pos]),
        ("hidden", [7], list(range(a, b))),
        ("embeds", [], list(range(a, b))),
    ]
    patches = []
    for row, (kind, layers, pos) in enumerate(specs):
        if kind == "embeds":
            vals = states[("embeds", -1)][pos]
        else:
            vals = torch.stack([states[(kind, layer)][pos] for layer in layers])
        patches.append(Patch(row, kind, pos, vals, layers=layers))
    batched = score_batch(vlm, [corrupt] * len(specs), patches=patches)
    for row, p in enumerate(patches):
        single = score_batch(vlm, [corrupt], patches=[Patch(0, p.kind, p.positions, p.values, p.layers)])[0]
        assert abs(batched[row].logprob - single.logprob) < 1e-5
    assert len({round(s.logprob, 4) for s in batched}) > 3, "different patches should give different numbers"


def test_add_mode_adds_to_a_module_output(vlm, world_dir):
    clean, _ = _pair(vlm, world_dir)
    states = _states(vlm, clean, kinds=("mlp",))
    c, layer = clean.constraint_last, 1
    delta = torch.randn(1, vlm.hidden_size, generator=torch.Generator().manual_seed(0))
    added = score_batch(vlm, [clean], patches=[Patch(0, "mlp", [c], delta, layers=[layer], mode="add")])[0]
    setv = score_batch(
        vlm, [clean], patches=[Patch(0, "mlp", [c], states[("mlp", layer)][[c]] + delta, layers=[layer])]
    )[0]
    assert abs(added.logprob - setv.logprob) < 1e-5
    zero = score_batch(
        vlm, [clean], patches=[Patch(0, "mlp", [c], torch.zeros_like(delta), layers=[layer], mode="add")]
    )[0]
    assert abs(zero.logprob - score_batch(vlm, [clean])[0].logprob) < 1e-6


def test_mixed_lengths_and_text_only_rows_in_one_batch(vlm, world_dir):
    clean, _ = _pair(vlm, world_dir)
    w = __import__("json").loads((world_dir / "world.json").read_text())
    city, country = next(iter(w["city_country"].items()))
    text = encode(vlm.processor, f"which country is {city} in ?", answer=country)
    together = score_batch(vlm, [text, clean, text])
    alone = [score_batch(vlm, [p])[0] for p in (text, clean)]
    assert abs(together[0].logprob - alone[0].logprob) < 1e-5
    assert abs(together[1].logprob - alone[1].logprob) < 1e-5
    assert abs(together[2].logprob - alone[0].logprob) < 1e-5


def test_knockout_mask_matches_plain_attention_and_blocks_what_it_should(vlm, world_dir):
    clean, _ = _pair(vlm, world_dir)
    base = score_batch(vlm, [clean])[0].logprob
    img = list(range(*clean.image_span))
    # an explicit mask that blocks nothing is the model's own causal attention
    none = score_batch(vlm, [clean], knockouts=[Knockout(0, range(vlm.num_layers), [clean.last_prompt_pos], [])])[0]
    assert abs(none.logprob - base) < 1e-5
    # blocking every text position from the image in every layer removes what the image says
    text_pos = list(range(clean.image_span[1], clean.length))
    blind = score_batch(vlm, [clean], knockouts=[Knockout(0, range(vlm.num_layers), text_pos, img)])[0]
    assert blind.logprob < base - 1.0
    # in a batch, the knockout of one row leaves the other row alone
    both = score_batch(vlm, [clean, clean], knockouts=[Knockout(1, range(vlm.num_layers), text_pos, img)])
    assert abs(both[0].logprob - base) < 1e-5 and abs(both[1].logprob - blind.logprob) < 1e-5
