"""The LLaVA-1.5-shaped random-weight model: 576 image tokens per prompt from the world's cases, loadable like
any checkpoint, and the diagnostics engines agree on it."""

import pytest

from diagnostics.cases import load_cases
from diagnostics.trace import causal_trace
from vlm import encode, load_vlm
from vlm.world.shapes import LLAVA15, ShapeConfig, llava15_shaped


@pytest.fixture(scope="module")
def shaped(vlm, tmp_path_factory):
    folder = llava15_shaped(vlm.path, tmp_path_factory.mktemp("shape") / "llava-1.5")
    return load_vlm(folder, device="cpu", dtype="float32")


def test_a_shaped_model_has_llava15s_576_image_tokens(shaped, world_dir, test_cases):
    case = test_cases[0]
    prompt = encode(shaped.processor, case["src"], image=world_dir / case["image"], constraints=[case["constraint"]])
    start, end = prompt.image_span
    assert end - start == 576 == LLAVA15.image_tokens
    assert tuple(prompt.pixel_values.shape) == (3, 336, 336)
    assert shaped.config.vision_config.image_size == 336 and shaped.config.vision_config.patch_size == 14
    out = shaped.model(input_ids=prompt.input_ids[None], pixel_values=prompt.pixel_values[None])
    assert out.logits.shape[1] == prompt.length


def test_building_again_reuses_the_folder_and_bad_shapes_are_refused(vlm, shaped):
    folder = shaped.path
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert llava15_shaped(vlm.path, folder) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ShapeConfig(image_size=335).check()
    with pytest.raises(ValueError, match="at least 2 layers"):
        ShapeConfig(layers=1).check()


def test_the_batched_cached_trace_equals_the_naive_one_at_576_image_tokens(shaped, world_dir):
    case = load_cases(world_dir / "edit_cases" / "test.json", limit=1, vlm=shaped)[0]
    kw = {"kinds": ["mlp"], "roles": ["constraint last"]}
    batched = causal_trace(shaped, case, mode="batched", **kw)
    naive = causal_trace(shaped, case, mode="naive", **kw)
    assert batched.cells == naive.cells > 0
    for a, b in zip(batched.effects["mlp"], naive.effects["mlp"]):
        assert a == pytest.approx(b, abs=1e-5)
