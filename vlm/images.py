"""Image input: a path, raw bytes or a PIL image decoded to RGB PIL, and the image as its model takes it
(``ProcessedImage``: the processor's tensors and how many prompt tokens stand for it)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from .errors import ImageDecodeError, PromptError

ImageInput = str | os.PathLike | bytes | bytearray | Image.Image


def load_image(image: ImageInput) -> Image.Image:
    """Decode ``image`` into an RGB PIL image or raise ``ImageDecodeError``."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        if not image:
            raise ImageDecodeError("the image is empty (0 bytes)")
        source, label = io.BytesIO(bytes(image)), f"{len(image)} bytes of image data"
    elif isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ImageDecodeError(f"image file not found: {path}")
        source, label = path, f"image file {path}"
    else:
        raise ImageDecodeError(f"unsupported image type {type(image).__name__}; give a path, bytes or a PIL image")
    try:
        with Image.open(source) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageDecodeError(f"cannot decode {label} as an image: not a format PIL can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode {label} as an image ({exc.__class__.__name__}: {exc})") from None


@dataclass(frozen=True)
class ProcessedImage:
    """One image as its model takes it: the processor's tensors for this image and the number of image tokens
    that stand for it in a prompt — fixed for LLaVA-1.5, following the image's size where the family tiles it
    (LLaVA-NeXT's anyres) or sizes it dynamically (Qwen2-VL).

    ``tensors`` hold this image alone: with the batch dimension removed (``pixel_values`` and, for tiles,
    ``image_sizes``), or — where the family concatenates images (``concatenated``: Qwen2-VL's patch rows and
    ``image_grid_thw``) — as the processor gave them for one image. ``token_types`` names the per-token input
    the processor adds to mark image tokens (Qwen2-VL's ``mm_token_type_ids``, Gemma 3's ``token_type_ids``),
    which ``collate`` rebuilds from each prompt's image span. ``expansion`` is the text the family's processor
    puts in place of the prompt's image placeholder (``token`` repeated ``num_tokens`` times, with Gemma 3's
    begin/end-of-image markers around them; for an image Idefics3 splits into crops, one run of image tokens per
    crop with row/column markers between the runs), ``token`` the image token the model fills with features."""

    tensors: dict[str, torch.Tensor]
    num_tokens: int
    concatenated: bool = False
    token_types: str | None = None
    expansion: str = ""
    token: str = "<image>"
    grid: tuple[int, int] | None = None  # (rows, columns) of the image tokens where they are one known rectangle

    @property
    def pixel_values(self) -> torch.Tensor:
        return self.tensors["pixel_values"]


def image_token(processor) -> str:
    """The token the model fills with image features: the tokenizer's image token where it names one (Gemma 3's
    soft token, which differs from its placeholder ``<start_of_image>``), else the processor's."""
    return getattr(processor.tokenizer, "image_token", None) or getattr(processor, "image_token", "<image>")


# the processor outputs that belong to the image (the rest — ids, masks — belong to the text)
_IMAGE_KEYS = ("pixel_values", "image_sizes", "pixel_attention_mask", "image_grid_thw")
# processors that concatenate a batch's images along the first axis instead of stacking them: Qwen2-VL's patch
# rows (told by its image_grid_thw) and InternVL's tiles (its image processor reports their num_patches, which
# InternVLProcessor drops from its own output)
_CONCATENATING = ("InternVLProcessor",)
# per-token inputs that mark the image tokens (1) among text tokens (0)
TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")


def process_image(processor, image: ImageInput | ProcessedImage) -> ProcessedImage:
    """Decode and preprocess ``image`` the way ``processor`` (the model's own multimodal processor) does,
    counting the image tokens its prompt expansion gives this image."""
    if isinstance(image, ProcessedImage):
        return image
    pil = load_image(image)
    placeholder = getattr(processor, "image_token", "<image>")
    out = processor(text=[placeholder], images=[pil], return_tensors="pt", return_text_replacement_offsets=True)
    token = image_token(processor)
    expansion = _replacement(out)
    if expansion is None and hasattr(processor, "replace_image_token"):
        try:
            expansion = processor.replace_image_token(out, image_idx=0)
        except KeyError:  # it reads an image-processor output the processor does not return (Gemma 3's num_crops)
            try:
                images = processor.image_processor([pil], return_tensors="pt")
                expansion = processor.replace_image_token(images, image_idx=0)
            except KeyError:  # an output the image processor gives only when asked (Idefics3's rows)
                pass
    if expansion is None:  # the expansion from the ids the processor gave for a lone placeholder
        expansion = _expansion_from_ids(processor.tokenizer, out["input_ids"][0].tolist())
    concatenated = (
        "image_grid_thw" in out
        or "num_patches" in out
        or bool({type(processor).__name__, getattr(processor, "processor_class", None)} & set(_CONCATENATING))
    )
    tensors = {k: v if concatenated else v[0] for k, v in out.items() if k in _IMAGE_KEYS}
    token_types = next((k for k in TOKEN_TYPE_KEYS if k in out), None)
    return ProcessedImage(
        tensors=tensors,
        num_tokens=expansion.count(token),
        concatenated=concatenated,
        token_types=token_types,
        expansion=expansion,
        token=token,
        grid=_token_grid(processor, out),
    )


def _token_grid(processor, out) -> tuple[int, int] | None:
    """The image tokens' (rows, columns) where the processor's outputs give them: a dynamic-resolution image
    (Qwen2-VL's ``image_grid_thw``: its patch grid, ``merge_size``² patches to a token). None elsewhere (a square
    count is drawn square; tiles and crops have no single grid)."""
    thw = out.get("image_grid_thw")
    merge = getattr(processor.image_processor, "merge_size", None)
    if thw is None or not merge or len(thw) != 1 or int(thw[0][0]) != 1:
        return None
    return int(thw[0][1]) // merge, int(thw[0][2]) // merge


def _replacement(out) -> str | None:
    """The text the processor put in place of the placeholder, where it reports it (transformers' processors
    do when asked for ``return_text_replacement_offsets``): Idefics3's split image — crops with row/column
    markers between them — comes out exactly as the processor writes it."""
    offsets = out.get("text_replacement_offsets")
    if not offsets or not offsets[0]:
        return None
    found = offsets[0][0]
    return found.get("replacement") if isinstance(found, dict) else None


def _expansion_from_ids(tokenizer, ids: list[int]) -> str:
    """The text of a lone placeholder's expansion from its token ids (the leading BOS dropped), where every
    token of it is an added token (markers and image tokens), so the text tokenizes back to the same ids."""
    if ids and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    text = "".join(tokenizer.convert_ids_to_tokens(ids))
    if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
        raise PromptError(
            "cannot tell the text this model's processor puts in place of the image: it is not made of image "
            "and marker tokens alone, and the processor does not report its replacement text"
        )
    return text


def from_pixels(processor, pixel_values: torch.Tensor) -> ProcessedImage:
    """Already processed pixel values ``(3, H, W)`` of a fixed-resolution family (LLaVA-1.5) as a
    ``ProcessedImage``: the token count follows from the patch grid as ``LlavaProcessor`` counts it. A tiling
    family's image has no such rule: give it through ``process_image``."""
    if pixel_values.dim() != 3 or getattr(processor.image_processor, "image_grid_pinpoints", None):
        raise ImageDecodeError(
            f"pixel values of shape {tuple(pixel_values.shape)} cannot stand alone for this model's processor "
            f"({type(processor).__name__}); pass the image itself (its size decides its image tokens)"
        )
    h, w = pixel_values.shape[-2:]
    n = (h // processor.patch_size) * (w // processor.patch_size) + getattr(processor, "num_additional_image_tokens", 0)
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        n -= 1
    token = image_token(processor)
    return ProcessedImage(tensors={"pixel_values": pixel_values}, num_tokens=n, expansion=token * n, token=token)


def _zero_padded(t: torch.Tensor, size: list[int]) -> torch.Tensor:
    if list(t.shape) == size:
        return t
    out = t.new_zeros(size)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def batch_images(
    images: list[ProcessedImage], device: torch.device | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The model inputs of several images in row order: each tensor stacked along a new batch dimension,
    tiled images' patch lists (and Idefics3's crops with their pixel masks) padded with zeros to the longest, as
    the family's processor pads them (the model reads each image's own count from its ``image_sizes``; Idefics3
    drops all-zero crops), or concatenated where the family takes them so (Qwen2-VL). Floating tensors take
    ``dtype``."""
    out: dict[str, torch.Tensor] = {}
    for key in images[0].tensors:
        parts = [im.tensors[key] for im in images]
        if images[0].concatenated:
            out[key] = torch.cat(parts)
        else:
            if any(p.shape != parts[0].shape for p in parts) and parts[0].dim() >= 3:
                # tiles and crops (and their masks) padded to the most, images at their own size (Pixtral) to
                # the largest height and width: zeros after the end of each axis, as the processors pad them
                size = [max(p.shape[d] for p in parts) for d in range(parts[0].dim())]
                parts = [_zero_padded(p, size) for p in parts]
            out[key] = torch.stack(parts)
    for key, t in out.items():
        if device is not None:
            t = t.to(device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t
    return out
