"""Batched generation across versions: one forward pass per step for rows of different versions, each row
answered exactly as the unbatched path answers it; row-scoped edits leave the other rows alone; rows leave a
batch when done or cancelled; one bad version fails only its own requests; the server batches concurrent
Generate and GenerateStream calls."""

import threading

import pytest
import torch

from editors import get_editor
from editors.attach import attach
from editors.finetune import FineTune, FineTuneConfig
from editors.multedit import MultEdit, MultEditConfig
from editors.request import EditRequest
from editors.visedit import VEAD, VEADConfig, VisEdit, VisEditSet
from server.batching import Batcher
from server.bundles import publish
from server.config import ServerConfig
from vlm import encode
from vlm.decoding import DecodeRow, greedy_batch
from vlm.hooks import Rows
from vlm.options import ConfigError
from vlm.prompts import left_padded


def _request(world_dir, case) -> EditRequest:
    req = EditRequest.from_case(case, world_dir)
    req.answer = case["alt"]  # a counterfactual: the edit changes the model's answer
    return req


@pytest.fixture(scope="module")
def edit_sets(vlm, world_dir, test_cases):
    """One edit set of each kind of edit the serving path applies: rank-one deltas (MultEdit), a key-gated
    memory (KeyGate), dense deltas (FT-L) and a VisEdit adapter (ungated: it edits every image row it is
    attached to, so a row it should not touch would show). The cases are the first four consecutive
    counterfactual cases on which each trained edit set changes the answer to its own question (what a short
    optimisation reaches on a case depends on the machine's arithmetic; the batching tests need edits that
    change answers, or a batch that ignored them would pass)."""
    cands = [c for c in test_cases if c["alt"] != c["pred"]]
    spec = get_editor("keygate")
    for start in range(min(6, len(cands) - 3)):
        cases = cands[start : start + 4]
        reqs = [_request(world_dir, c) for c in cases]
        torch.manual_seed(0)
        vead = VEAD(VEADConfig(hidden_size=vlm.hidden_size, layer=0, signal_layer=0, width=32))
        with torch.no_grad():
            vead.w3.weight.normal_(0, 0.5)
        sets = {
            "multedit": MultEdit(vlm, MultEditConfig(layer=0, steps=25)).edit_sequentially(reqs[:2]),
            "keygate": spec.create(vlm, spec.config(vlm, layer=0, steps=25)).edit_sequentially(reqs[2:3]),
            "ft": FineTune(vlm, FineTuneConfig(layer=0, steps=20)).edit_sequentially(reqs[3:4]),
            "visedit": VisEdit(vlm, VisEditSet(vead.eval(), vlm.fingerprint)).edit(reqs[:1]),
        }
        questions = {
            g: encode(vlm.processor, cases[k]["src"], image=world_dir / cases[k]["image"]) for g, k in EDITED.items()
        }
        if all(_unbatched(vlm, questions[g], sets[g]) != _unbatched(vlm, questions[g], None) for g in TRAINED):
            return sets, cases
    pytest.fail("no four consecutive counterfactual cases whose short edits each change their own answer")


def _prompts(vlm, world_dir, cases):
    """Image and text-only prompts of different lengths, about the edited facts and others."""
    out = []
    for c in cases:
        out.append(encode(vlm.processor, c["src"], image=world_dir / c["image"]))
        out.append(encode(vlm.processor, c["rephrase"], image=world_dir / c["image_rephrase"]))
        out.append(encode(vlm.processor, c["m_loc_q"], image=world_dir / c["m_loc"]))
    out.append(encode(vlm.processor, "What is the capital of nowhere?"))
    out.append(encode(vlm.processor, cases[0]["src"]))
    return out


#: the case each edit set edits (its ``_prompts`` are 3k: the question, 3k + 1: its rephrase)
EDITED = {"multedit": 0, "keygate": 2, "ft": 3, "visedit": 0}
#: the edit sets trained on their cases (the VisEdit adapter is random: its effect is checked on the logits)
TRAINED = ("multedit", "keygate", "ft")

#: which prompts of ``_prompts`` each group asks in the mixed batch: every edit set its own edited facts
#: (cases 0-1 MultEdit, 2 KeyGate, 3 FT-L; VisEdit edits case 0's image), other facts and a text-only prompt
MIX = {
    None: [0, 8, 12],
    "multedit": [0, 4, 9, 13],
    "keygate": [6, 7, 2],
    "ft": [9, 10, 12],
    "visedit": [0, 3, 5, 13],
}


def _unbatched(vlm, prompt, edit_set, new_tokens=8) -> list[int]:
    """The reference every decoding path must match: transformers' generate on the one prompt, the edit set
    attached for the thread."""
    kwargs = {} if prompt.pixel_values is None else {"pixel_values": prompt.pixel_values[None]}
    with torch.no_grad(), attach(vlm, edit_set):
        out = vlm.model.generate(
            input_ids=prompt.input_ids[None],
            attention_mask=torch.ones(1, prompt.length, dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=vlm.tokenizer.eos_token_id,
            pad_token_id=vlm.tokenizer.pad_token_id,
            **kwargs,
        )
    return out[0, prompt.length :].tolist()


@pytest.mark.numerics
def test_a_mixed_batch_answers_every_row_as_the_unbatched_path_does(vlm, world_dir, edit_sets):
    sets, cases = edit_sets
    prompts = _prompts(vlm, world_dir, cases)
    order = [(g, i) for g, idx in MIX.items() for i in idx]
    order = order[::2] + order[1::2]  # the groups interleaved in the batch
    rows = [DecodeRow(prompts[i], 8, g) for g, i in order]
    got = greedy_batch(vlm, rows, lambda g, sel: attach(vlm, sets[g], rows=sel))
    want = [_unbatched(vlm, r.prompt, sets.get(r.group)) for r in rows]
    assert got == want
    # the trained edits did act, on their own rows: each answers one of its edited facts otherwise than the
    # base model (the VisEdit adapter here is random: its effect on its rows is checked on the logits below)
    changed = {r.group for r, a in zip(rows, got) if r.group is not None and a != _unbatched(vlm, r.prompt, None)}
    assert set(TRAINED) <= changed


@pytest.mark.numerics
@pytest.mark.parametrize("editor", ["multedit", "keygate", "ft", "visedit"])
def test_row_scoped_edits_leave_the_other_rows_of_the_batch_bit_for_bit(vlm, world_dir, edit_sets, editor):
    sets, cases = edit_sets
    k = EDITED[editor]
    other = (k + 1) % len(cases)
    every = _prompts(vlm, world_dir, cases)  # rows 1, 2: the edited fact's question and its rephrase
    prompts = [every[3 * other + 2], every[3 * k], every[3 * k + 1], every[3 * other]]
    inputs = left_padded(vlm, prompts)
    with torch.no_grad():
        base = vlm.model(**inputs).logits
        with attach(vlm, sets[editor], rows=Rows([1, 2])):
            scoped = vlm.model(**inputs).logits
        with attach(vlm, sets[editor]):
            everywhere = vlm.model(**inputs).logits
    for r in (0, 3):
        assert torch.equal(scoped[r], base[r])
    for r in (1, 2):
        assert torch.allclose(scoped[r], everywhere[r], atol=1e-5)
    assert not torch.equal(scoped[1:3], base[1:3])


def _a_prompt_with_a_long_answer(vlm, world_dir, test_cases, tokens=3):
    """A world question (with its image, or text-only) whose base answer has ``tokens`` tokens or more (its
    end-of-sequence token included), found at run time: how long a particular answer is depends on the
    machine's arithmetic."""
    asked = 0
    for c in test_cases:
        for p in (
            encode(vlm.processor, c["loc"]),
            encode(vlm.processor, c["m_loc_q"], image=world_dir / c["m_loc"]),
            encode(vlm.processor, c["src"], image=world_dir / c["image"]),
        ):
            asked += 1
            if len(_unbatched(vlm, p, None)) >= tokens:
                return p
        if asked >= 60:
            break
    pytest.fail(f"none of {asked} world questions has an answer of {tokens} tokens or more")


@pytest.mark.numerics
def test_rows_leave_the_batch_when_done_or_cancelled_and_the_rest_keep_their_answers(
    vlm, world_dir, test_cases, edit_sets
):
    sets, cases = edit_sets
    # the prompts of every length, and last, in both groups, one whose answer outlasts the two that finish first
    prompts = _prompts(vlm, world_dir, cases)
    prompts += [_a_prompt_with_a_long_answer(vlm, world_dir, test_cases)] * 2
    want = {i: _unbatched(vlm, p, sets["multedit"] if i % 2 else None) for i, p in enumerate(prompts)}
    assert len(want[len(prompts) - 2]) >= 3
    seen: dict[int, int] = {}

    def counting(i):
        return lambda token: seen.__setitem__(i, seen.get(i, 0) + 1)

    rows = []
    for i, p in enumerate(prompts):
        budget = 1 if i in (0, 1) else 8  # two rows (of both groups) finish at the first step
        cancel = (lambda i=i: seen.get(i, 0) >= 1) if i == 2 else None  # row 2's client goes away
        rows.append(DecodeRow(p, budget, "m" if i % 2 else None, on_token=counting(i), cancelled=cancel))
    got = greedy_batch(vlm, rows, lambda g, sel: attach(vlm, sets["multedit"], rows=sel))
    assert got[0] == want[0][:1] and got[1] == want[1][:1]
    assert got[2] == want[2][:1] and seen[2] == 1
    for i in range(3, len(prompts)):
        assert got[i] == want[i], i
    assert seen == {i: len(a) for i, a in enumerate(got)}


class _BrokenBundle:
    """A version whose edits fail when attached (a corrupt or incompatible edit set)."""

    def attached(self, vlm, rows=None):
        raise ValueError("this version's edits cannot be applied")


def test_a_bad_version_fails_only_its_own_requests(vlm, world_dir, test_cases):
    case = test_cases[0]
    prompt = encode(vlm.processor, case["src"], image=world_dir / case["image"])
    batcher = Batcher(vlm, max_batch=4, wait=5.0)
    try:
        with batcher.arriving(), batcher.arriving():  # both requests are read before the batch starts
            bad = batcher.submit(prompt, 4, _BrokenBundle())
            good = batcher.submit(prompt, 4, None)
        assert good.answer() == _unbatched(vlm, prompt, None, 4)
        with pytest.raises(ValueError, match="cannot be applied"):
            bad.answer()
        stats = batcher.stats()
        assert stats["largest_batch"] == 1 and stats["rows"] == 1  # the batch of two failed, then one by one
    finally:
        batcher.close()
    with pytest.raises(Exception, match="shutting down"):
        batcher.submit(prompt, 4, None)


def test_batching_options_are_checked():
    with pytest.raises(ConfigError, match="max_batch_size"):
        ServerConfig(max_batch_size=0).check()
    with pytest.raises(ConfigError, match="batch_wait_ms"):
        ServerConfig(batch_wait_ms=-1).check()


@pytest.mark.numerics
def test_the_server_batches_concurrent_requests_of_several_versions(start_service, vlm, world_dir, edit_sets, tmp_path):
    sets, cases = edit_sets
    batched = start_service(max_batch_size=8, batch_wait_ms=500)
    versions = {
        name: publish(batched.registry, vlm, "mix", {es.editor: es}, edits=es.records, promote=False).version
        for name, es in sets.items()
        if name != "visedit"  # a VisEdit version needs its adapter's training summary; its rows are tested above
    }
    plain = start_service(data_dir=batched.data_dir, max_batch_size=1)
    refs = [{"base": True}] + [{"adapter": "mix", "version": v} for v in versions.values()]
    asks = [(world_dir / c["image"], c["src"]) for c in cases] + [(None, "What is the capital of nowhere?")]
    jobs = [(img, q, ref) for img, q in asks for ref in refs]
    with plain.client() as lens:
        want = [lens.generate(img, q, **ref).text for img, q, ref in jobs]

    got: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def ask(i):
        img, q, ref = jobs[i]
        with batched.client() as lens:
            start.wait(30)
            got[i] = lens.generate(img, q, **ref).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want
    assert batched.server.service.host.batcher.stats()["largest_batch"] >= 2
    assert len(set(want)) > 1  # the versions answer differently

    # streaming stays per request: the pieces make the same answer; a stream closed early leaves its batch
    img, q, ref = jobs[1]
    with batched.client() as lens:
        assert "".join(lens.generate_stream(img, q, **ref)) == want[1]
        pieces = lens.generate_stream(img, q, max_new_tokens=32, **ref)
        next(pieces)
        pieces.close()
        assert lens.generate(img, q, **ref).text == want[1]
