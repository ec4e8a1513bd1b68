"""A stand-in for a family's processor where transformers cannot build it on this machine.

transformers 5 builds the processors of Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision and InternVL with a video processor,
and without torchvision it cannot make one: ``AutoProcessor`` fails on such a folder (``VIDEO_PROCESSOR_MAPPING
has no attribute '_extra_content'``), and torchvision on a CPU-only x86 machine means a CUDA build of torch.
EditLens reads images only, so ``ImageTextProcessor`` composes the folder's own tokenizer, image processor,
chat template and processor settings (``processor_config.json``: e.g. OneVision's ``num_image_tokens`` and
``vision_aspect_ratio``) and expands each image placeholder with the family processor's own code: its
``replace_image_token`` and the helpers it calls are borrowed from the family's processor class and run on
the stand-in (with the markers such a processor takes from its tokenizer, InternVL's ``<img>``/``</img>``), so
the text that stands for an image is transformers' by construction. One exception: Mistral 3's
``PixtralProcessor`` will not even import without torchvision, so its rule is copied (``_COPIED_RULES``).
``load_vlm`` uses the stand-in only when the family's processor cannot be built (with torchvision installed,
the family's own processor is used).

It offers what EditLens uses of a processor: ``tokenizer``, ``image_processor``, ``image_token(_id)``,
``chat_template``, ``apply_chat_template(..., tokenize=False)``, ``__call__(text=, images=)`` and
``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import torch

# processor settings that are not the tokenizer's, image processor's or template's (kept and saved)
_SETTINGS = (
    "num_image_tokens",
    "vision_feature_select_strategy",
    "vision_aspect_ratio",
    "patch_size",
    "image_seq_length",
    "spatial_merge_size",
)


def _pixtral_replacement(self, image_inputs, image_idx: int, **_kw) -> str:
    """``PixtralProcessor.replace_image_token`` of transformers 5.24, copied: without torchvision transformers
    will not even import that class (its module imports the torchvision image processor), so it cannot be
    borrowed. A row of ``[IMG]`` per merged patch row, ``[IMG_BREAK]`` after each row, ``[IMG_END]`` last."""
    patch = self.patch_size * self.spatial_merge_size
    height, width = (int(v) for v in image_inputs["image_sizes"][image_idx])
    rows = [[self.image_token] * (width // patch) + [self.image_break_token]] * (height // patch)
    tokens = [t for row in rows for t in row]
    tokens[-1] = self.image_end_token
    return "".join(tokens)


# the expansion rules of family processors that transformers cannot import here (not only build)
_COPIED_RULES = {"PixtralProcessor": _pixtral_replacement}


class ImageTextProcessor:
    """Tokenizer + image processor + chat template + the family processor's settings, expanding images with
    the family processor class's own ``replace_image_token`` (``arch.processor_class``)."""

    def __init__(
        self,
        image_processor,
        tokenizer,
        chat_template: str | None,
        arch,
        image_token: str | None = None,
        settings: dict[str, Any] | None = None,
    ):
        """``arch``: the family's ``ArchitectureMap`` (its processor class and default image token);
        ``image_token``: the placeholder (default: the tokenizer's, else the family's); ``settings``: the family
        processor's own settings (``processor_config.json``)."""
        import transformers

        self._family = getattr(transformers, arch.processor_class)
        self._copied = None
        try:
            self._family.replace_image_token  # noqa: B018 - a placeholder class raises here
        except ImportError:
            if arch.processor_class not in _COPIED_RULES:
                raise
            self._copied = _COPIED_RULES[arch.processor_class]
        self.processor_class = arch.processor_class
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template
        self.settings = {k: v for k, v in (settings or {}).items() if k in _SETTINGS}
        for k, v in self.settings.items():
            setattr(self, k, v)
        image_token = image_token or getattr(tokenizer, "image_token", None) or arch.default_image_token
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no image token {image_token!r}")

    def __getattr__(self, name: str):
        """The family processor's helpers (e.g. ``_get_number_of_features``), bound to the stand-in."""
        if name.startswith("__") or name in ("_family", "_copied"):
            raise AttributeError(name)
        if name.endswith("_token") and hasattr(self.tokenizer, name):
            return getattr(self.tokenizer, name)  # a marker the family processor takes from its tokenizer (<img>)
        if self._copied is not None:  # the family's class cannot be imported here: nothing to borrow
            raise AttributeError(name)
        attr = getattr(self._family, name)
        return types.MethodType(attr, self) if callable(attr) else attr

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
        settings = {}
        if (path / "processor_config.json").is_file():
            settings = json.loads((path / "processor_config.json").read_text())
        return cls(images, tokenizer, template, arch, settings.get("image_token"), settings)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        if self.chat_template:
            (folder / "chat_template.jinja").write_text(self.chat_template)
        # name the family's processor, as its own folders do (with torchvision, AutoProcessor builds that one)
        config = {**self.settings, "image_token": self.image_token, "processor_class": self.processor_class}
        (folder / "processor_config.json").write_text(json.dumps(config, indent=2))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["processor_class"] = self.processor_class
        cfg_path.write_text(json.dumps(cfg, indent=2))

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kw):
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=tokenize,
            **kw,
        )

    def replace_image_token(self, image_inputs, image_idx: int, **_kw) -> str:
        """The text that stands for image ``image_idx`` of the image processor's output (its image tokens and
        the family's markers around them): the family processor's own ``replace_image_token``, run on the
        stand-in (or its copied rule)."""
        if self._copied is not None:
            return self._copied(self, image_inputs, image_idx)
        return self._family.replace_image_token(self, image_inputs, image_idx=image_idx)

    def __call__(self, text=None, images=None, return_tensors: str = "pt", **_ignored):
        """Like the family's processor: each placeholder in ``text`` (one per image, in order) expanded to its
        image's tokens; returns input_ids, attention_mask, the image tensors and, where the family's processor
        gives them, mm_token_type_ids."""
        text = [text] if isinstance(text, str) else list(text or [])
        out: dict[str, torch.Tensor] = {}
        if images:
            out.update(self.image_processor(images, return_tensors="pt"))
            replacements = iter(self.replace_image_token(out, i) for i in range(len(images)))
            expanded = []
            for t in text:
                parts = t.split(self.image_token)
                pieces = [parts[0]]
                for part in parts[1:]:
                    pieces += [next(replacements), part]
                expanded.append("".join(pieces))
            text = expanded
        enc = self.tokenizer(text, return_tensors="pt", padding=True)
        out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        if self._copied is None and getattr(self._family, "return_mm_token_type_ids", False):  # Qwen2-VL's marks
            out["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()
        return out
