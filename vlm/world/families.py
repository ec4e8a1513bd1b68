"""Tiny random-weight models of the other families EditLens supports, built from the world's model folder.

Every capability (loading, prompt spans, patching, the diagnostics, the editors, the PEFT export, serving)
is tested on each family's own transformers classes without a download: ``tiny_family`` writes a model
folder of the family — its config class, its multimodal processor with its own image processor, the world's
tokenizer and chat template — with a few narrow layers and seeded random weights. Such a model knows no
facts; it checks that EditLens follows the family's shapes (tiled images, image tokens that vary with the
image's size) exactly, not editing quality.

Families: ``llava_next`` (LLaVA-NeXT's anyres tiling: 32-pixel tiles on a grid chosen by the image's
aspect ratio, so a 64×64 image has 24 image tokens and a 32×64 one 14), ``llava_onevision`` (the same
tiling with a SigLIP tower and a Qwen2 decoder; the stand-in processor), ``qwen2_vl`` (dynamic
resolution: 8-pixel patches on a grid that follows the image's size, 2×2 merged per token, so 64×64 gives 16
tokens and 64×40 gives 8; M-RoPE positions; its processor is ``vlm.processors.ImageTextProcessor``, as
transformers cannot build Qwen2-VL's without torchvision), and ``qwen2_5_vl`` (Qwen2-VL's decoder, image
geometry and M-RoPE; a vision tower with window attention), ``gemma3`` (image tokens that attend to each other
both ways, between begin/end-of-image markers; a fixed 4 tokens per image) and ``idefics3`` (SmolVLM's
model_type; image splitting on as SmolVLM ships it: 32-pixel crops plus the whole image downscaled, each crop a
run of 4 image tokens after its ``<row_i_col_j>`` marker, so a square image has 5 runs, 20 tokens, and a tall
one 3 runs) and ``internvl`` (32-pixel tiles on the grid closest to the image's aspect ratio plus a thumbnail,
4 tokens each, in one run between ``<img>`` and ``</img>``; the stand-in processor) and ``mistral3`` (a
Pixtral tower on the image at its own size, a row of image tokens per patch row with ``[IMG_BREAK]`` after
each and ``[IMG_END]`` at the end; the stand-in processor with the copied Pixtral rule).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .shapes import write_model_folder

TINY_FAMILIES = (
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "gemma3",
    "idefics3",
    "internvl",
    "mistral3",
)

# 32-pixel tiles, 16-pixel patches: each tile is a 2×2 patch grid
_TILE, _PATCH = 32, 16
_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
# Qwen2-VL: 8-pixel patches, 2×2 merged into one token: a 64×64 image is an 8×8 grid, 16 tokens
_QWEN_PATCH = 8
# at the usual initialisation (std 0.02) a narrow model's logits span well under one nat, so no edit can make
# an answer likely; the readout is scaled up so that edits are measurable
_READOUT_SCALE = 25.0


# bumped when a builder changes what it writes, so that a folder from an older builder is not reused
_BUILDER_VERSION = 3
_NORM = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def _decoder(tok, **extra) -> dict:
    """Every tiny family's decoder: 4 layers, 64 wide, the tokenizer's vocabulary and special ids."""
    return {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": False,
        **extra,
    }


def _vision(**extra) -> dict:
    """Every tiny family's vision tower: 2 layers, 32 wide, 32-pixel images."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": _TILE,
        **extra,
    }


def _llava_next(world):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    config = LlavaNextConfig(
        vision_config=_vision(model_type="clip_vision_model", patch_size=_PATCH, projection_dim=32),
        text_config=_decoder(world.tokenizer, model_type="llama"),
        image_token_id=world.image_token_id,
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": _TILE},
        crop_size={"height": _TILE, "width": _TILE},
        image_grid_pinpoints=_PINPOINTS,
        **_NORM,
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


def _llava_onevision(world):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from ..architecture import LLAVA_ONEVISION
    from ..processors import ImageTextProcessor

    config = LlavaOnevisionConfig(
        vision_config=_vision(model_type="siglip_vision_model", patch_size=_PATCH),
        text_config=_decoder(world.tokenizer, model_type="qwen2"),
        image_token_id=world.image_token_id,
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    images = LlavaOnevisionImageProcessorPil(
        size={"height": _TILE, "width": _TILE}, image_grid_pinpoints=_PINPOINTS, **_NORM
    )
    settings = {
        "num_image_tokens": (_TILE // _PATCH) ** 2,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9",
    }
    processor = ImageTextProcessor(
        images, world.tokenizer, world.chat_template, LLAVA_ONEVISION, world.image_token, settings
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


def _qwen(world, family: str):
    """Qwen2-VL or Qwen2.5-VL (the same decoder and M-RoPE; Qwen2.5-VL's vision tower has window attention,
    SwiGLU blocks and its own output width)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..architecture import ARCHITECTURES
    from ..processors import ImageTextProcessor

    arch = ARCHITECTURES[family]
    text_config = _decoder(world.tokenizer)
    half = text_config["hidden_size"] // text_config["num_attention_heads"] // 2  # M-RoPE: (t, h, w) sections
    text_config["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8],
    }
    vision = {"depth": 2, "num_heads": 2, "patch_size": _QWEN_PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=text_config["hidden_size"], mlp_ratio=2)
    else:  # the window is in pixels: 32 px = one 2x2 group of merged tokens
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=text_config["hidden_size"])
        vision.update(window_size=32, fullatt_block_indexes=[1])
    config_class = getattr(transformers, arch.model_class.replace("ForConditionalGeneration", "Config"))
    config = config_class(
        text_config=text_config, vision_config=vision, image_token_id=world.image_token_id, tie_word_embeddings=False
    )
    images = Qwen2VLImageProcessorPil(
        min_pixels=16 * 16, max_pixels=64 * 64, patch_size=_QWEN_PATCH, merge_size=2, temporal_patch_size=2, **_NORM
    )
    processor = ImageTextProcessor(images, world.tokenizer, world.chat_template, arch, world.image_token)
    return getattr(transformers, arch.model_class)(config), processor


def _with_tokens(world_tokenizer, marks: dict[str, str], added: Sequence[str] = ()):
    """The world's tokenizer with a family's image markers as special tokens: ``marks`` named as the family's
    own tokenizer names them (Gemma 3's ``boi_token``, ...), ``added`` unnamed (Idefics3's)."""
    import copy

    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(world_tokenizer.backend_tokenizer)
    backend.add_special_tokens([*marks.values(), *added])
    named = {"image_token": world_tokenizer.image_token, **marks}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=world_tokenizer.bos_token,
        eos_token=world_tokenizer.eos_token,
        unk_token=world_tokenizer.unk_token,
        pad_token=world_tokenizer.pad_token,
        extra_special_tokens=named,
        model_max_length=world_tokenizer.model_max_length,
        padding_side="right",
    )


def _idefics3(world):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    # SmolVLM's tokenizer has the crop markers <row_i_col_j> as added tokens beside the image markers
    rows = [f"<row_{i}_col_{j}>" for i in range(1, 3) for j in range(1, 3)]
    tok = _with_tokens(world.tokenizer, {}, ["<fake_token_around_image>", "<global-img>", *rows])
    config = Idefics3Config(
        vision_config=_vision(patch_size=8),
        text_config=_decoder(tok, model_type="llama"),
        scale_factor=2,  # the 4×4 patch grid shuffled into 4 tokens
        image_token_id=tok.convert_tokens_to_ids(tok.image_token),
        tie_word_embeddings=False,
    )
    # image splitting on, as SmolVLM ships it: an image is resized to 64 on its longest edge and split into
    # 32-pixel crops (2×2 for a square, 2×1 for a tall one) plus the whole image downscaled, each crop a run of
    # 4 image tokens with its row/column marker before it (20 tokens for a square image, 12 for a tall one)
    images = Idefics3ImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 2 * _TILE}, max_image_size={"longest_edge": _TILE}, **_NORM
    )
    processor = Idefics3Processor(images, tok, image_seq_len=4, chat_template=world.chat_template)
    return Idefics3ForConditionalGeneration(config), processor


def _gemma3(world):
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = _with_tokens(
        world.tokenizer,
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    ids = {name: tok.convert_tokens_to_ids(getattr(tok, name)) for name in ("boi_token", "eoi_token", "image_token")}
    config = Gemma3Config(
        # an 8-token sliding window on layers 0 and 2 (Gemma 3's is 1,024 on five layers of six): the prompts here
        # are longer, so the window's mask is in play in every test
        text_config=_decoder(
            tok,
            num_key_value_heads=1,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
        vision_config=_vision(patch_size=8),
        mm_tokens_per_image=4,  # the 4×4 patch grid pooled to 2×2
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
        tie_word_embeddings=False,
    )
    images = Gemma3ImageProcessorPil(size={"height": _TILE, "width": _TILE}, **_NORM)
    template = world.chat_template.replace("<image>", tok.boi_token)  # Gemma's placeholder
    processor = Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=template, image_seq_length=4)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # the projection starts at zero (every image would look the same): give it weights
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 32**-0.5)
    return model, processor


def _internvl(world):
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from ..architecture import INTERNVL
    from ..processors import ImageTextProcessor

    marks = {
        "image_token": "<IMG_CONTEXT>",
        "context_image_token": "<IMG_CONTEXT>",
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "video_token": "<video>",
    }
    tok = _with_tokens(world.tokenizer, marks)
    config = InternVLConfig(
        vision_config=_vision(patch_size=_QWEN_PATCH, image_size=_TILE),
        text_config=_decoder(tok, model_type="qwen2"),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,  # a 32-pixel tile: 4×4 patches, pixel-shuffled by 0.5 into 4 tokens
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    # tiles as InternVL cuts them: up to 4 32-pixel tiles on the grid closest to the image's aspect ratio, and a
    # thumbnail when there is more than one (a square image 2×2 + 1 = 5 tiles, a tall one 1×2 + 1 = 3)
    images = GotOcr2ImageProcessorPil(
        size={"height": _TILE, "width": _TILE}, crop_to_patches=True, min_patches=1, max_patches=4, **_NORM
    )
    processor = ImageTextProcessor(
        images,
        tok,
        world.chat_template.replace("<image>", "<IMG_CONTEXT>"),
        INTERNVL,
        "<IMG_CONTEXT>",
        {"image_seq_length": 4},
    )
    return InternVLForConditionalGeneration(config), processor


def _mistral3(world):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from ..architecture import MISTRAL3
    from ..processors import ImageTextProcessor

    marks = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
    tok = _with_tokens(world.tokenizer, marks)
    config = Mistral3Config(
        vision_config={"model_type": "pixtral", **_vision(patch_size=_QWEN_PATCH, image_size=2 * _TILE)},
        text_config=_decoder(tok, model_type="mistral", head_dim=32),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    # an image at its own size (longest edge 64) on 8-pixel patches, 2×2 merged per token: 64×64 is 4 rows of
    # 4 tokens, 32×64 (tall) 4 rows of 2
    images = PixtralImageProcessorPil(size={"longest_edge": 2 * _TILE}, patch_size=_QWEN_PATCH, **_NORM)
    settings = {"patch_size": _QWEN_PATCH, "spatial_merge_size": 2}
    template = world.chat_template.replace("<image>", "[IMG]")
    processor = ImageTextProcessor(images, tok, template, MISTRAL3, "[IMG]", settings)
    return Mistral3ForConditionalGeneration(config), processor


_BUILDERS = {
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": lambda world: _qwen(world, "qwen2_vl"),
    "qwen2_5_vl": lambda world: _qwen(world, "qwen2_5_vl"),
    "gemma3": _gemma3,
    "idefics3": _idefics3,
    "internvl": _internvl,
    "mistral3": _mistral3,
}


def tiny_family(family: str, world_model: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight model folder of ``family`` (one of ``TINY_FAMILIES``) to ``out``
    (atomically), with the world's tokenizer and chat template; returns ``out``. A folder made with the
    same settings is reused."""
    import torch

    if family not in _BUILDERS:
        raise ValueError(f"no tiny builder for the family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    world_model, out = Path(world_model), Path(out)
    stamp = {"family": family, "seed": seed, "tokenizer_of": str(world_model), "builder": _BUILDER_VERSION}
    marker = out / "editlens-family.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    from transformers import AutoProcessor

    world = AutoProcessor.from_pretrained(world_model)  # its tokenizer, image token and chat template
    torch.manual_seed(seed)
    model, processor = _BUILDERS[family](world)
    model.eval()
    with torch.no_grad():  # a readout strong enough that one answer can dominate, as in a trained model
        model.get_output_embeddings().weight.mul_(_READOUT_SCALE)
    return write_model_folder(model, processor, out, marker, stamp)
