"""Loading checkpoints: the architecture map, and clear errors for bad folders."""

import json

import pytest

from vlm import ARCHITECTURES, ModelLoadError, load_vlm


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_vlm(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_vlm(tmp_path)


def test_non_llava_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="not a vision-language family EditLens knows"):
        load_vlm(tmp_path)


def test_pickle_only_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelLoadError, match="no .safetensors"):
        load_vlm(tmp_path)


def test_loaded_model_and_architecture_map(vlm):
    arch = ARCHITECTURES["llava"]
    assert vlm.arch is arch
    assert vlm.dtype.is_floating_point and str(vlm.device) == "cpu"
    assert vlm.num_layers >= 8
    layers = arch.decoder_layers(vlm.model)
    assert len(layers) == vlm.num_layers
    for path in (
        arch.embed_tokens,
        arch.final_norm,
        arch.lm_head,
        arch.vision_tower,
        arch.projector,
        arch.module_path("mlp", 0),
        arch.module_path("attn", 3),
        arch.module_path("down_proj", 7),
    ):
        assert vlm.module(path) is not None
    assert vlm.module(arch.module_path("down_proj", 0)).in_features == vlm.text_config.intermediate_size
    assert vlm.image_token_id == vlm.processor.image_token_id
    assert len(vlm.fingerprint) == 32
