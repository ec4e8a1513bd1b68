"""Image input: a path, raw bytes or a PIL image, always returned as RGB PIL."""

from __future__ import annotations

import io
import os

from PIL import Image, UnidentifiedImageError

from .errors import ImageDecodeError

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
