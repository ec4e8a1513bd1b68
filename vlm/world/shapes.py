"""Random-weight models in a full-size model's shapes, built from the embedded world's model folder.

The world's tiny LLaVA has 16 image tokens (64×64 images, 16-pixel patches);
LLaVA-1.5 has 576 (336×336 images, 14-pixel patches), which is where the
diagnostics' prefix cache and batching matter. ``llava15_shaped`` writes a
LLaVA-1.5-shaped model — the same 336/14 vision geometry, hence 576 image
tokens per prompt, and LLaVA-1.5's projector and feature selection — with a
narrow width and few layers so that it runs on two CPU cores in a few GB. Its
weights are random (seeded): it knows no facts; it measures speed and the
equality of engines at the real prompt shape, not quality. The tokenizer and
chat template are the world's (the world's test cases are its prompts); the
image processor resizes to 336×336.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ShapeConfig:
    """A LLaVA-1.5-shaped model: LLaVA-1.5's image geometry with a narrow, shallow tower and decoder."""

    image_size: int = 336
    patch_size: int = 14
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 2048
    seed: int = 0

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def check(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("vision_hidden_size", "hidden_size"):
            heads = self.vision_heads if name.startswith("vision") else self.heads
            if getattr(self, name) % heads:
                raise ValueError(f"{name} {getattr(self, name)} is not a multiple of its {heads} heads")
        if min(self.vision_layers, self.layers) < 2:
            raise ValueError("the vision tower and the decoder need at least 2 layers (features come from layer -2)")


LLAVA15 = ShapeConfig()


def llava15_shaped(world_model: str | Path, out: str | Path, shape: ShapeConfig = LLAVA15) -> Path:
    """Write a LLaVA-1.5-shaped random-weight model folder to ``out`` (atomically) from the world's model folder
    (its tokenizer, chat template and token ids); returns ``out``. An existing folder made with the same
    settings is reused."""
    import torch
    from transformers import (
        AutoProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    shape.check()
    world_model, out = Path(world_model), Path(out)
    stamp = {"shape": asdict(shape), "tokenizer_of": str(world_model)}
    marker = out / "editlens-shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    base = LlavaConfig.from_pretrained(world_model)
    processor = AutoProcessor.from_pretrained(world_model)
    size = {"height": shape.image_size, "width": shape.image_size}
    processor.image_processor.size = dict(size)
    processor.image_processor.crop_size = dict(size)
    processor.patch_size = shape.patch_size
    processor.tokenizer.model_max_length = shape.max_positions
    text = base.text_config
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=shape.vision_hidden_size,
            intermediate_size=4 * shape.vision_hidden_size,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads,
            image_size=shape.image_size,
            patch_size=shape.patch_size,
            projection_dim=shape.vision_hidden_size,
        ),
        text_config=LlamaConfig(
            vocab_size=text.vocab_size,
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.heads,
            max_position_embeddings=shape.max_positions,
            pad_token_id=text.pad_token_id,
            bos_token_id=text.bos_token_id,
            eos_token_id=text.eos_token_id,
            tie_word_embeddings=False,
        ),
        image_token_id=base.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=shape.image_tokens,
    )
    torch.manual_seed(shape.seed)
    model = LlavaForConditionalGeneration(config).eval()
    return write_model_folder(model, processor, out, marker, stamp)


def write_model_folder(model, processor, out: Path, marker: Path, stamp: dict) -> Path:
    """Save ``model`` and ``processor`` (end-of-sequence and padding from the text config) with the ``stamp``
    of the settings that made them at ``marker``, into ``out`` atomically (a half-written folder is never
    left there); returns ``out``."""
    text = model.config.get_text_config()
    model.generation_config.pad_token_id = text.pad_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".model-", dir=out.parent) as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        (folder / marker.relative_to(out)).write_text(json.dumps(stamp, indent=1))
        if out.exists():
            shutil.rmtree(out)
        folder.rename(out)
    return out
