"""Tiny random-weight models of the other families EditLens supports, built from the world's model folder.

Every capability (loading, prompt spans, patching, the diagnostics, the editors, the PEFT export, serving)
is tested on each family's own transformers classes without a download: ``tiny_family`` writes a model
folder of the family — its config class, its multimodal processor with its own image processor, the world's
tokenizer and chat template — with a few narrow layers and seeded random weights. Such a model knows no
facts; it checks that EditLens follows the family's shapes (tiled images, image tokens that vary with the
image's size) exactly, not editing quality.

Families: ``llava_next`` (LLaVA-NeXT's anyres tiling: 32-pixel tiles on a grid chosen by the image's
aspect ratio, so a 64×64 image has 24 image tokens and a 32×64 one 14).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

TINY_FAMILIES = ("llava_next",)

# 32-pixel tiles, 16-pixel patches: each tile is a 2×2 patch grid
_TILE, _PATCH = 32, 16
_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _llava_next(world_model: Path):
    from transformers import (
        AutoProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    base = LlavaConfig.from_pretrained(world_model)
    world = AutoProcessor.from_pretrained(world_model)
    text = base.text_config
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=_TILE,
            patch_size=_PATCH,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=text.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=text.pad_token_id,
            bos_token_id=text.bos_token_id,
            eos_token_id=text.eos_token_id,
            tie_word_embeddings=False,
        ),
        image_token_id=base.image_token_id,
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": _TILE},
        crop_size={"height": _TILE, "width": _TILE},
        image_grid_pinpoints=_PINPOINTS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaNextProcessor(
        image_processor=images,
        tokenizer=world.tokenizer,
        patch_size=_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=world.chat_template,
    )
    return LlavaNextForConditionalGeneration(config), processor


_BUILDERS = {"llava_next": _llava_next}


def tiny_family(family: str, world_model: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight model folder of ``family`` (one of ``TINY_FAMILIES``) to ``out``
    (atomically), with the world's tokenizer and chat template; returns ``out``. A folder made with the
    same settings is reused."""
    import torch

    if family not in _BUILDERS:
        raise ValueError(f"no tiny builder for the family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    world_model, out = Path(world_model), Path(out)
    stamp = {"family": family, "seed": seed, "tokenizer_of": str(world_model)}
    marker = out / "editlens-family.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    torch.manual_seed(seed)
    model, processor = _BUILDERS[family](world_model)
    model.eval()
    text = model.config.get_text_config()
    model.generation_config.pad_token_id = text.pad_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".family-", dir=out.parent) as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        (folder / "editlens-family.json").write_text(json.dumps(stamp, indent=1))
        if out.exists():
            shutil.rmtree(out)
        folder.rename(out)
    return out
