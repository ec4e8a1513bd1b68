"""KeyGate keys an edit also by the variants its request supplies (its rephrase, its image rephrase, both) and
optimises the entry's value on all of them: the edit answers every image and wording the user gave with it."""

import pytest

from editors import get_editor
from editors.attach import attach
from editors.request import EditRequest
from vlm import encode, generate

CASES = 4


def _variants(c):
    return [
        (c["src"], c["image"]),
        (c["rephrase"], c["image"]),
        (c["src"], c["image_rephrase"]),
        (c["rephrase"], c["image_rephrase"]),
    ]


@pytest.mark.numerics
def test_a_keygate_edit_answers_the_images_and_wordings_its_request_supplied(vlm, world_dir, test_cases):
    spec = get_editor("keygate")
    # cases whose new answer the model does not give already on any variant, so that an answer is the edit's
    cases = [c for c in test_cases if c["pred"] != c["alt"]][:CASES]
    assert len(cases) == CASES, "the world has too few edit cases for this test"

    def ask(pairs):
        prompts = [encode(vlm.processor, q, image=world_dir / img) for q, img in pairs]
        return generate(vlm, prompts, max_new_tokens=4)

    answered = []
    for c in cases:
        req = EditRequest.from_case(c, world_dir)  # with the case's rephrase and image rephrase
        edit = spec.create(vlm, spec.config(vlm, layer=0)).edit_sequentially([req])
        (record,) = edit.records
        assert record["keys"] == 4  # one key per supplied prompt, all in the edit's entry
        assert edit.gates[0].keys.shape[0] == 4 and set(edit.gates[0].entry_of.tolist()) == {0}
        with attach(vlm, edit):
            answered.append([a == c["alt"] for a in ask(_variants(c))])
    rate = sum(map(sum, answered)) / (4 * CASES)
    assert rate >= 0.9, f"with its variants keyed, an edit answered {rate:.2f} of the prompts its request supplied"


def test_an_edit_without_variants_has_one_key(vlm, world_dir, test_cases):
    """A request that supplies no variant, or an editor told not to use them (``variants=False``): one key."""
    c = test_cases[0]
    spec = get_editor("keygate")
    bare = EditRequest(c["src"], c["constraint"], c["alt"], image=world_dir / c["image"])
    full = EditRequest.from_case(c, world_dir)
    for req, variants in ((bare, True), (full, False)):
        edit = spec.create(vlm, spec.config(vlm, layer=0, steps=1, variants=variants)).edit([req])
        assert edit.records[0]["keys"] == 1 and edit.gates[0].keys.shape[0] == 1
