"""An edit set exported as a PEFT LoRA adapter loads with plain PEFT and gives the edited answers."""

import json

import pytest
import torch

from editors.attach import attach
from editors.multedit import EditRequest, MultEdit, MultEditConfig
from editors.peft_export import export_peft
from vlm import collate, run_patched, score_answers


@pytest.mark.numerics
def test_peft_round_trip_gives_the_edited_model(vlm, world_dir, test_cases, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    by_entity = {}
    for c in test_cases:
        by_entity.setdefault(c["entity"], c)
    cases = list(by_entity.values())[:3]
    reqs = [EditRequest.from_case(c, world_dir) for c in cases]
    joint = MultEdit(vlm, MultEditConfig(layer=1)).edit(reqs[:2])  # rank 2 at layer 1
    both = MultEdit(vlm, MultEditConfig(layer=2)).edit(reqs[2:], onto=joint)  # + rank 1 at layer 2
    base = LlavaForConditionalGeneration.from_pretrained(vlm.path, dtype=torch.float32)
    editor = MultEdit(vlm, MultEditConfig(layer=1))
    prompts = [editor.encode(r) for r in reqs]
    inputs = collate(prompts, vlm.tokenizer.pad_token_id)

    # one module, rank 2: plain PEFT gives both new answers
    out = export_peft(joint, tmp_path / "joint", str(vlm.path))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2 and cfg["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        with attach(vlm, joint):
            attached = vlm.model(**inputs).logits
    assert torch.allclose(logits, attached, atol=1e-4, rtol=1e-4)  # the logits of the edited model
    model.unload()

    # two modules of different rank: the adapter computes exactly what attaching the edit set does
    out = export_peft(both, tmp_path / "both", str(vlm.path))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted({d.module for d in both.deltas}) and cfg["r"] == 2
    assert list(cfg["rank_pattern"].values()) == [1]
    with attach(vlm, both):
        ours = run_patched(vlm, inputs).hidden
    model = PeftModel.from_pretrained(base, str(out)).eval()
    lora_vlm = type(vlm)(**{**vlm.__dict__, "model": model.base_model.model})
    theirs = run_patched(lora_vlm, inputs).hidden
    assert torch.allclose(ours, theirs, atol=1e-3, rtol=1e-4)
    assert not any(s.exact for s in score_answers(vlm, prompts)), "the base model is unchanged"
