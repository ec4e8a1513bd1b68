"""An image-and-text processor for families whose transformers processor cannot be built on this machine.

transformers 5 builds the processors of Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision with a video processor,
and without torchvision it cannot make one: ``AutoProcessor`` fails on such a folder (``VIDEO_PROCESSOR_MAPPING
has no attribute '_extra_content'``), and torchvision on a CPU-only x86 machine means a CUDA build of torch.
EditLens reads images only, so ``ImageTextProcessor`` composes the folder's own tokenizer, image processor and
chat template and expands each image placeholder by the family's rule — the same rule as the family's
processor (``tests/test_families.py`` checks it against the processor class's own ``replace_image_token``).
``load_vlm`` uses it only when the family's processor cannot be built (with torchvision installed the
family's own processor is used).

It offers what EditLens uses of a processor: ``tokenizer``, ``image_processor``, ``image_token(_id)``,
``chat_template``, ``apply_chat_template(..., tokenize=False)``, ``__call__(text=, images=)`` and
``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# rules for the number of image tokens of image ``i`` given the image processor's output
RULES = ("grid_merge",)


class ImageTextProcessor:
    """Tokenizer + image processor + chat template, with the family's image-token rule.

    ``grid_merge`` (Qwen2-VL, Qwen2.5-VL): an image of patch grid (t, h, w) stands for t·h·w / merge_size²
    tokens, and the model takes ``mm_token_type_ids`` (1 on image tokens) beside the ids.
    """

    def __init__(self, image_processor, tokenizer, chat_template: str | None, arch, image_token: str | None = None):
        """``arch``: the family's ``ArchitectureMap`` (its image-token rule, default image token and processor
        class); ``image_token``: the placeholder (default: the tokenizer's, else the family's)."""
        if arch.fallback_processor not in RULES:
            raise ValueError(f"unknown image-token rule {arch.fallback_processor!r}; known: {', '.join(RULES)}")
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template
        self.rule, self.processor_class = arch.fallback_processor, arch.processor_class
        image_token = image_token or getattr(tokenizer, "image_token", None) or arch.default_image_token
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no image token {image_token!r}")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, arch) -> ImageTextProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        images = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        template = template or getattr(tokenizer, "chat_template", None)
        return cls(images, tokenizer, template, arch)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        # name the family's processor, as its own folders do (with torchvision, AutoProcessor builds that one)
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["processor_class"] = self.processor_class
        cfg_path.write_text(json.dumps(cfg, indent=2))
        if self.chat_template:
            (folder / "chat_template.jinja").write_text(self.chat_template)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kw):
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=tokenize,
            **kw,
        )

    def num_image_tokens(self, image_inputs, index: int) -> int:
        """Tokens of image ``index`` of the image processor's output (the family's rule)."""
        grid = image_inputs["image_grid_thw"][index]
        return int(grid.prod()) // self.image_processor.merge_size**2

    def __call__(self, text=None, images=None, return_tensors: str = "pt", **_ignored):
        """Like the family's processor: each placeholder in ``text`` (one per image, in order) expanded to its
        image's tokens; returns input_ids, attention_mask, mm_token_type_ids and the image tensors."""
        text = [text] if isinstance(text, str) else list(text or [])
        out: dict[str, torch.Tensor] = {}
        if images:
            out.update(self.image_processor(images, return_tensors="pt"))
            counts = iter(self.num_image_tokens(out, i) for i in range(len(images)))
            expanded = []
            for t in text:
                parts = t.split(self.image_token)
                pieces = [parts[0]]
                for part in parts[1:]:
                    pieces += [self.image_token * next(counts), part]
                expanded.append("".join(pieces))
            text = expanded
        enc = self.tokenizer(text, return_tensors="pt", padding=True)
        out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        out["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()
        return out
