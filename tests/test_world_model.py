"""The embedded default model: knows its facts, needs its image, loads without EditLens."""

import hashlib
import json
import subprocess
import sys
import time

import pytest

from vlm import encode, generate
from vlm.world import WorldConfig, build_world
from vlm.world.train import ModelConfig, TrainConfig


def test_accuracy_targets(world_summary):
    assert world_summary["train_accuracy"] >= 0.98
    assert world_summary["heldout_paraphrase_accuracy"] >= 0.90
    assert world_summary["text_fact_accuracy"] >= 0.95
    assert world_summary["counts"]["decoder_layers"] >= 8
    assert world_summary["counts"]["image_tokens"] >= 16


def test_second_build_is_cached(world_summary):
    t = time.time()
    again = build_world(seed=0)
    assert again["cached"] is True
    assert again["build_key"] == world_summary["build_key"]
    assert time.time() - t < 30  # generous: reading a JSON file, not training


def test_the_model_needs_the_image(vlm, world_dir):
    """Showing another entity's image (with a different true answer) changes the answer."""
    w = json.loads((world_dir / "world.json").read_text())
    ents = [e for e in w["entities"] if e["known"]]
    originals, swapped = [], []
    for e in ents:
        for rel, value in e["facts"].items():
            other = next(o for o in ents if o["kind"] == e["kind"] and o["facts"][rel] != value)
            template = next(r for r in w["relations"] if r["name"] == rel)["heldout_templates"][0]
            q = template.format(s=w["kind_constraint"][e["kind"]])
            originals.append(encode(vlm.processor, q, image=world_dir / e["images"][1]))
            swapped.append(encode(vlm.processor, q, image=world_dir / other["images"][1]))
    a, b = generate(vlm, originals, max_new_tokens=4), generate(vlm, swapped, max_new_tokens=4)
    changed = sum(x != y for x, y in zip(a, b)) / len(a)
    assert len(a) >= 100
    assert changed >= 0.9


PLAIN = r"""
import json, sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
root = sys.argv[1]
proc = AutoProcessor.from_pretrained(root + "/model")
model = LlavaForConditionalGeneration.from_pretrained(root + "/model").eval()
items = [q for q in json.load(open(root + "/questions/heldout_paraphrase.json"))][::23][:24]
right = 0
for q in items:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["question"]}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(images=Image.open(root + "/" + q["image"]), text=text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    ans = proc.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    right += ans == q["answer"]
print(json.dumps({"n": len(items), "right": right}))
"""


@pytest.mark.slow
def test_saved_folder_works_with_plain_transformers(world_dir):
    res = subprocess.run(
        [sys.executable, "-c", PLAIN, str(world_dir)], capture_output=True, text=True, timeout=300, cwd="/"
    )  # cwd=/ : the project's packages are not importable by path
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["n"] >= 20
    assert got["right"] / got["n"] >= 0.9


def _small_build(seed, out, family="llava"):
    return build_world(
        seed=seed,
        out=out,
        world_cfg=WorldConfig(seed=seed, known_per_kind=3, unseen_per_kind=1, renderings=3, train_renderings=2),
        model_cfg=ModelConfig(
            family=family,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            vision_hidden_size=32,
            vision_layers=2,
            vision_heads=2,
            vision_intermediate_size=64,
        ),
        train_cfg=TrainConfig(steps=12, batch_size=16, warmup=2, vision_pretrain_steps=10, vision_pretrain_batch=16),
    )


def _digest(path):
    return hashlib.sha256((path / "model" / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_world_builds_in_qwen2_vl_deterministically_and_serves_its_family(tmp_path):
    """`world build --family qwen2_vl`: the same world trained in Qwen2-VL (its vision transformer and merger,
    M-RoPE), as deterministic as the LLaVA build, loading as a Qwen2-VL model whose images are 16 tokens."""
    from vlm import load_vlm

    a, b = _small_build(3, tmp_path / "a", "qwen2_vl"), _small_build(3, tmp_path / "b", "qwen2_vl")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") and a["train_accuracy"] == b["train_accuracy"]
    assert a["family"] == "qwen2_vl" and a["counts"]["image_tokens"] == 16
    vlm = load_vlm(tmp_path / "a" / "model", device="cpu")
    assert vlm.arch.family == "qwen2_vl" and type(vlm.model).__name__ == "Qwen2VLForConditionalGeneration"
    llava = _small_build(3, tmp_path / "c")
    assert llava["build_key"] != a["build_key"], "the family is part of the build key"


@pytest.mark.slow
def test_builds_are_deterministic_per_seed(tmp_path):
    a, b, _c = _small_build(3, tmp_path / "a"), _small_build(3, tmp_path / "b"), _small_build(4, tmp_path / "c")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert (tmp_path / "a" / "world.json").read_text() == (tmp_path / "b" / "world.json").read_text()
    for key in ("train_accuracy", "heldout_paraphrase_accuracy", "text_fact_accuracy"):
        assert a[key] == b[key]
    assert (tmp_path / "a" / "world.json").read_text() != (tmp_path / "c" / "world.json").read_text()
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
