"""Where things live inside a model family: the one place that knows module paths.

Every editor and diagnostic reaches a module through an ``ArchitectureMap``,
so supporting a new family is one entry in ``ARCHITECTURES`` — its module
paths, model and processor classes, and the few ways families differ beyond
paths: positions (M-RoPE), attention over the image (bidirectional) and a
processor transformers cannot build here. The families and their tests:
docs/families.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class ArchitectureMap:
    """Module paths (dotted, relative to the top model) of one model family."""

    family: str
    model_types: tuple[str, ...]
    model_class: str
    base_model: str  # the model without its LM head; returns last_hidden_state
    language_model: str
    embed_tokens: str
    layers: str
    final_norm: str
    lm_head: str
    vision_tower: str
    projector: str
    # relative to one decoder layer
    attn: str = "self_attn"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    mlp: str = "mlp"
    down_proj: str = "mlp.down_proj"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    image_token_id_attr: str = "image_token_id"
    rope: str = "1d"  # "1d": one position per token; "mrope": Qwen2-VL's (time, height, width) triples
    # where transformers cannot build the family's processor (a video processor without torchvision),
    # vlm.processors.ImageTextProcessor stands in, running the family processor's own image-token code
    fallback_processor: bool = False
    default_image_token: str = "<image>"
    processor_class: str = "LlavaProcessor"  # the family's own processor class in transformers
    # "causal": image tokens attend causally as text does; "bidirectional": they attend to each other both ways
    # (Gemma 3), so runs that start the language model mid-sequence must build its own mask
    image_attention: str = "causal"

    # ------------------------------------------------------------ accessors
    def get(self, model: nn.Module, path: str) -> nn.Module:
        """The submodule at ``path`` (dotted, relative to the top model)."""
        return model.get_submodule(path)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)  # type: ignore[return-value]

    def layer_path(self, layer: int, sub: str | None = None) -> str:
        """Path of decoder layer ``layer`` (or of ``sub`` inside it, e.g. ``mlp.down_proj``)."""
        base = f"{self.layers}.{layer}"
        return f"{base}.{sub}" if sub else base

    def module_path(self, kind: str, layer: int) -> str:
        """Path of the module whose output is the state ``kind`` at ``layer``.

        kind: ``hidden`` (decoder layer output, the residual stream),
        ``mlp`` (MLP output), ``attn`` (self-attention output),
        ``down_proj`` (the MLP's down projection; its input is the MultEdit key).
        """
        sub = {"hidden": None, "mlp": self.mlp, "attn": self.attn, "down_proj": self.down_proj}
        if kind not in sub:
            raise ValueError(f"unknown module kind {kind!r}; expected one of {sorted(sub)}")
        return self.layer_path(layer, sub[kind])


LLAVA = ArchitectureMap(
    family="llava",
    model_types=("llava",),
    model_class="LlavaForConditionalGeneration",
    base_model="model",
    language_model="model.language_model",
    embed_tokens="model.language_model.embed_tokens",
    layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
)

# LLaVA-NeXT (LLaVA-1.6): LLaVA's module layout; "anyres" tiles each image by its aspect ratio, so the
# image-token count follows the image's size (the processor's ``image_sizes`` carry it to the model).
LLAVA_NEXT = dataclasses.replace(
    LLAVA,
    family="llava_next",
    model_types=("llava_next",),
    model_class="LlavaNextForConditionalGeneration",
    processor_class="LlavaNextProcessor",
)

# LLaVA-OneVision: LLaVA-NeXT's layout (SigLIP tower without a class token, a Qwen2 decoder); anyres tiles
# up to a maximum ("anyres_max_9"), features pooled down beyond it.
LLAVA_ONEVISION = dataclasses.replace(
    LLAVA_NEXT,
    family="llava_onevision",
    model_types=("llava_onevision",),
    model_class="LlavaOnevisionForConditionalGeneration",
    processor_class="LlavaOnevisionProcessor",
    fallback_processor=True,
)

# Qwen2-VL: dynamic resolution (an image of any size becomes a patch grid; 2×2 patches merge into one token),
# M-RoPE positions, the projector (merger) inside the vision tower.
QWEN2_VL = dataclasses.replace(
    LLAVA,
    family="qwen2_vl",
    model_types=("qwen2_vl",),
    model_class="Qwen2VLForConditionalGeneration",
    processor_class="Qwen2VLProcessor",
    vision_tower="model.visual",
    projector="model.visual.merger",
    rope="mrope",
    fallback_processor=True,
    default_image_token="<|image_pad|>",
)

# Qwen2.5-VL: Qwen2-VL's layout, image geometry and M-RoPE; window attention inside the vision tower.
QWEN2_5_VL = dataclasses.replace(
    QWEN2_VL,
    family="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    model_class="Qwen2_5_VLForConditionalGeneration",
    processor_class="Qwen2_5_VLProcessor",
)

# Gemma 3: a SigLIP tower pooled to a fixed number of soft tokens between begin/end-of-image markers; image
# tokens attend to each other bidirectionally (the model builds that mask from token_type_ids).
GEMMA3 = dataclasses.replace(
    LLAVA,
    family="gemma3",
    model_types=("gemma3",),
    model_class="Gemma3ForConditionalGeneration",
    processor_class="Gemma3Processor",
    image_attention="bidirectional",
)

# Idefics3 (and SmolVLM, its model_type): a SigLIP tower, a pixel-shuffle connector and a Llama decoder named
# text_model; the image's tokens sit between <fake_token_around_image> markers. With image splitting on (as
# SmolVLM ships), an image becomes crops, one run of image tokens per crop after its <row_i_col_j> marker.
IDEFICS3 = ArchitectureMap(
    family="idefics3",
    model_types=("idefics3",),
    model_class="Idefics3ForConditionalGeneration",
    processor_class="Idefics3Processor",
    base_model="model",
    language_model="model.text_model",
    embed_tokens="model.text_model.embed_tokens",
    layers="model.text_model.layers",
    final_norm="model.text_model.norm",
    lm_head="lm_head",
    vision_tower="model.vision_model",
    projector="model.connector",
)

# InternVL (2.5 / 3, transformers' internvl): LLaVA's layout with an InternViT tower, a pixel-shuffle projector
# and a Qwen2 (or Llama) decoder; an image is cut into tiles by its aspect ratio (plus a thumbnail), every
# tile's tokens in one run between <img> and </img>, the tiles concatenated in pixel_values.
INTERNVL = dataclasses.replace(
    LLAVA,
    family="internvl",
    model_types=("internvl",),
    model_class="InternVLForConditionalGeneration",
    processor_class="InternVLProcessor",
    fallback_processor=True,
    default_image_token="<IMG_CONTEXT>",
)

# Mistral 3 (Mistral Small 3.1 / 3.2): LLaVA's layout with a Pixtral tower (an image at its own size on a patch
# grid, 2×2 patches merged in the projector) and a Mistral decoder; the image's tokens come a row at a time, an
# [IMG_BREAK] after each row and [IMG_END] after the last: one run of image tokens per row.
MISTRAL3 = dataclasses.replace(
    LLAVA,
    family="mistral3",
    model_types=("mistral3",),
    model_class="Mistral3ForConditionalGeneration",
    processor_class="PixtralProcessor",
    image_token_id_attr="image_token_index",
    fallback_processor=True,
    default_image_token="[IMG]",
)

ARCHITECTURES: dict[str, ArchitectureMap] = {
    t: a
    for a in (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, QWEN2_VL, QWEN2_5_VL, GEMMA3, IDEFICS3, INTERNVL, MISTRAL3)
    for t in a.model_types
}


def early_layers(num_layers: int, fraction: float = 0.5) -> list[int]:
    """The decoder layers in the first ``fraction`` of the model (default: the first half, at least one):
    where the papers find visual facts recalled and where MultEdit edits. The one rule every diagnostic,
    recommendation and check uses."""
    if not 0 < fraction <= 1:
        raise ValueError("the early fraction must be in (0, 1]")
    return list(range(max(1, int(num_layers * fraction))))


def architecture_for(model_type: str) -> ArchitectureMap | None:
    """The architecture map of a config's ``model_type``, or None when EditLens has no entry for it."""
    return ARCHITECTURES.get(model_type)
