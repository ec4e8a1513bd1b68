"""The diagnostics: every batched computation equals the naive reference; the traces find what the
world's model does and what an edit wrote; bad requests get clear errors."""

import pytest
import torch

from bench.diagnostics import new_facts
from diagnostics.attention import attention_contributions, auroc
from diagnostics.attribution import module_attribution, visual_attribution
from diagnostics.cases import DiagnosticCase, load_cases, prepare, world_phrases
from diagnostics.errors import DiagnosticError, ReplacementError
from diagnostics.knockout import RELATIONS, knockout
from diagnostics.trace import causal_trace, edit_trace, noise_trace
from editors.attach import attach
from editors.edit_set import EditSet
from editors.multedit import MultEdit, MultEditConfig
from editors.request import EditRequest
from vlm import ConstraintNotFoundError, Knockout, Patch, collate, encode, run_patched
from vlm.patching import PrefixCache, run_suffix

TOL = 1e-5


@pytest.fixture(scope="module")
def case(vlm, world_dir):
    return load_cases(world_dir / "edit_cases" / "test.json", limit=1, vlm=vlm)[0]


def _close(a, b):
    return max(abs(x - y) for x, y in zip(a, b)) <= TOL


def test_suffix_run_over_a_cached_prefix_equals_the_full_pass(vlm, case):
    p = encode(vlm.processor, case.question, pixel_values=case.pixel_values, constraints=[case.constraint])
    inputs = collate([p] * 3, vlm.tokenizer.pad_token_id)
    embeds = run_patched(vlm, collate([p], vlm.tokenizer.pad_token_id), capture=[("embeds", -1)]).captured[
        ("embeds", -1)
    ]
    v = torch.randn(1, vlm.hidden_size)
    patches = [
        Patch(0, "hidden", [p.constraint_last], v, [2]),
        Patch(1, "mlp", [p.last_prompt_pos], v, [5], mode="add"),
    ]
    knock = [Knockout(2, [1, 2, 3], [p.last_prompt_pos], p.image_positions)]
    full = run_patched(vlm, inputs, patches=patches, knockouts=knock, capture=[("attn", 4)])
    pre = PrefixCache.build(vlm, embeds, p.constraint_spans[0][0])
    cached = run_suffix(vlm, embeds.expand(3, -1, -1), pre, patches=patches, knockouts=knock, capture=[("attn", 4)])
    rows, pos = [0, 1, 2], [p.last_prompt_pos] * 3
    assert (full.logits_at(rows, pos) - cached.logits_at(rows, pos)).abs().max() < TOL
    assert (full.captured[("attn", 4)][:, pre.length :] - cached.captured[("attn", 4)]).abs().max() < TOL
    with pytest.raises(IndexError, match="cached prefix"):
        run_suffix(vlm, embeds, pre, patches=[Patch(0, "hidden", [1], v, [0])])


@pytest.mark.numerics
def test_token_replacement_trace_batched_equals_naive_and_shows_the_recall(vlm, case):
    runs = {m: causal_trace(vlm, case, window=3, mode=m) for m in ("batched", "uncached", "naive")}
    ref = runs["naive"]
    for m in ("batched", "uncached"):
        assert abs(runs[m].p_corrupt - ref.p_corrupt) <= TOL
        for k in ref.kinds:
            for a, b in zip(runs[m].effects[k], ref.effects[k]):
                assert _close(a, b), (m, k)
    r = runs["batched"]
    assert r.forward_passes < r.cells == ref.forward_passes
    assert r.p_clean > 0.9 and r.p_corrupt < 0.1 * r.p_clean  # the replacement removes the answer
    assert r.replacement and r.replacement in r.corrupted_question
    # what the world's model does: the subject is read at the constraint in the early layers and
    # moved to the last position later; the image precedes the constraint, so restoring it does nothing
    assert r.effect("hidden", "constraint last")[0] > 0.5
    assert r.effect("hidden", "last token")[-1] > 0.5
    assert all(v == 0.0 for v in r.effect("hidden", "image (all)"))
    assert any(row.constraint for row in r.rows)
    iso = {
        m: causal_trace(vlm, case, kinds=["mlp"], isolate=True, mode=m, roles=["constraint last"])
        for m in ("batched", "naive")
    }
    assert _close(iso["batched"].effects["mlp"][0], iso["naive"].effects["mlp"][0])


@pytest.mark.numerics
def test_noise_trace_batched_equals_naive(vlm, case):
    kw = {"kinds": ["hidden", "attn"], "samples": 2, "roles": ["image (all)", "constraint last", "last token"]}
    a, b = noise_trace(vlm, case, mode="batched", **kw), noise_trace(vlm, case, mode="naive", **kw)
    assert abs(a.p_corrupt - b.p_corrupt) <= TOL and a.noise == b.noise
    for k in a.kinds:
        for x, y in zip(a.effects[k], b.effects[k]):
            assert _close(x, y)
    assert a.p_corrupt < a.p_clean
    # what holds for any model: restoring the last position's output of the last layer restores the whole
    # clean answer distribution there, so its indirect effect is all of P_clean - P_corrupt
    assert a.effect("hidden", "last token")[-1] == pytest.approx(a.p_clean - a.p_corrupt, abs=1e-4)


@pytest.mark.numerics
def test_knockout_contributions_and_attributions_batched_equal_naive(vlm, case):
    prep = prepare(vlm, case)
    ka, kb = (knockout(vlm, prep, relations=RELATIONS, mode=m) for m in ("batched", "naive"))
    assert set(ka.curves) == set(kb.curves) and len(ka.curves) == 4 + 4  # 4 relations + 4 patch-grid rows
    for name in ka.curves:
        assert _close(ka.curves[name], kb.curves[name]), name
    assert min(ka.curves["question->last"]) < -0.5  # the last position needs the question
    ca, cb = (attention_contributions(vlm, prep, mode=m) for m in ("batched", "naive"))
    for x, y in zip(ca.visual + ca.constraint, cb.visual + cb.constraint):
        assert _close(x, y)
    assert ca.correct is True and 0 < ca.confidence <= 1 and ca.early_score > 0
    ma, mb = (module_attribution(vlm, prep, mode=m) for m in ("batched", "naive"))
    assert _close(ma.attention + ma.mlp, mb.attention + mb.mlp)
    assert all(0 <= c <= 1 for c in ma.attention + ma.mlp) and max(ma.mlp) > 0
    va, vb = (visual_attribution(vlm, prep, layers=[1, 3], samples=1, mode=m) for m in ("batched", "naive"))
    for x, y in zip(va.maps, vb.maps):
        assert _close(x, y)
    assert va.grid == (4, 4) and len(va.maps[0]) == 16 and va.forward_passes < vb.forward_passes


def test_auroc():
    assert auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9], [True, True, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5


@pytest.mark.numerics
@pytest.mark.slow
def test_the_trace_of_an_insertion_peaks_at_the_layer_it_was_written_to(vlm, world_dir, test_cases):
    """Ground truth: a new fact inserted by MultEdit at layer k. Its edit trace (the edited model's clean
    states restored into the base model's corrupted run, minus the base model's own) must peak at k
    in the MLP, and be exactly 0 before k."""
    inserts = new_facts(vlm, world_dir, test_cases)[:3]
    phrases = world_phrases(world_dir)
    hits, total = 0, 0
    for k in range(4):
        editor = MultEdit(vlm, MultEditConfig(layer=k))
        for rec in inserts:
            es = editor.edit([EditRequest.from_case(rec, world_dir)])
            case = DiagnosticCase(
                rec["src"],
                rec["constraint"],
                image=world_dir / rec["image"],
                answer=rec["alt"],
                replacements=[p for p in phrases if rec["entity_name"] not in p],
            )
            r = edit_trace(vlm, case, lambda es=es: attach(vlm, es), kinds=["mlp"], roles=["constraint last"])
            effect = r.effects["mlp"][0]
            hits += max(range(len(effect)), key=effect.__getitem__) == k
            total += 1
            assert all(v == 0.0 for v in effect[:k])
    assert hits / total >= 0.9, f"{hits}/{total}"


@pytest.mark.numerics
def test_multedit_auto_layer_stores_its_evidence(vlm, world_dir, test_cases, tmp_path):
    rec = next(c for c in test_cases if c["type"] == "insertion")
    editor = MultEdit(vlm, MultEditConfig(layer="auto"))
    es = editor.edit([EditRequest.from_case(rec, world_dir)])
    hp = es.hyperparameters
    assert hp["layer"] == "auto" and hp["chosen_layer"] == es.records[0]["layer"] == es.deltas[0].layer
    ev = hp["layer_evidence"]
    assert ev["layer"] in ev["candidates"] and len(ev["scores"]) == vlm.num_layers
    assert ev["scores"][ev["layer"]] == max(ev["scores"][l] for l in ev["candidates"])
    assert len(ev["details"]["per_case"]) == 3  # question, rephrase, other image
    assert es.records[0]["metrics"]["p_after"] > es.records[0]["metrics"]["p_before"]  # the value raised it
    path = tmp_path / "auto.safetensors"
    es.save(path)
    assert EditSet.load(path, vlm).hyperparameters["layer_evidence"]["scores"] == ev["scores"]


def test_bad_requests_get_clear_errors(vlm, world_dir, case):
    with pytest.raises(ConstraintNotFoundError, match="does not occur"):
        causal_trace(vlm, DiagnosticCase(case.question, "this river", pixel_values=case.pixel_values))
    with pytest.raises(DiagnosticError, match="larger than the model"):
        causal_trace(vlm, case, window=vlm.num_layers + 1)
    with pytest.raises(DiagnosticError, match="positive"):
        knockout(vlm, case, window=0)
    with pytest.raises(ReplacementError, match="tokens"):
        causal_trace(vlm, case, replacement="the one big tall old landmark")
    with pytest.raises(DiagnosticError, match="unknown knockout relation"):
        knockout(vlm, case, relations=["image->nowhere"])
    with pytest.raises(DiagnosticError, match="outside"):
        visual_attribution(vlm, case, layers=[vlm.num_layers])
    with pytest.raises(DiagnosticError, match="needs an image"):
        causal_trace(vlm, DiagnosticCase(case.question, case.constraint))
    with pytest.raises(DiagnosticError, match="does not exist"):
        load_cases(world_dir / "no-such-file.json")
