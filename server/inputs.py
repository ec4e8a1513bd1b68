"""Request inputs checked against the server's limits: images, texts and prompts.

Each check raises a ``ServiceError`` with the status code the contract names
(INVALID_ARGUMENT for an empty text or a prompt over the token limit,
RESOURCE_EXHAUSTED for an image over the byte or pixel limit); an undecodable
image is ``vlm.errors.ImageDecodeError`` (INVALID_ARGUMENT, ``server.errors``).
"""

from __future__ import annotations

import io

from vlm.images import load_image
from vlm.prompts import EncodedPrompt, encode

from .config import Limits
from .errors import exhausted, invalid

#: the image formats a request may send (PIL decodes many more; some, like EPS, call external programs)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class Inputs:
    """The limits a request's inputs are checked against, and the model's processor to encode them."""

    def __init__(self, limits: Limits, vlm):
        self.limits, self.vlm = limits, vlm
        self.max_prompt_tokens = limits.max_prompt_tokens
        if self.max_prompt_tokens is None:
            ctx = getattr(vlm.text_config, "max_position_embeddings", None) or 4096
            self.max_prompt_tokens = max(1, int(ctx) - limits.max_new_tokens)

    def image(self, data: bytes, what: str = "image", required: bool = True):
        """Decoded image bytes within the limits; None when absent and optional."""
        from PIL import Image

        if not data:
            if required:
                raise invalid(f"the {what} is missing (send the image file's bytes)")
            return None
        if len(data) > self.limits.max_image_bytes:
            raise exhausted(f"the {what} is {len(data)} bytes; the limit is {self.limits.max_image_bytes}")
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
                w, h = probe.size
        except Image.DecompressionBombError:  # PIL refuses to open a header claiming this many pixels
            raise exhausted(
                f"the {what} claims more pixels than PIL opens; the limit is {self.limits.max_image_pixels}"
            ) from None
        except Image.UnidentifiedImageError:
            try:  # a format PIL reads but the server does not take (EPS would run Ghostscript, ...)
                with Image.open(io.BytesIO(data)) as other:
                    kind = other.format
            except Exception:
                kind = None
            if kind is not None:
                raise invalid(f"the {what} is {kind}; the server takes {', '.join(IMAGE_FORMATS)}") from None
            w = h = 0  # undecodable: load_image below says why, with the right status
        except Exception:  # undecodable: load_image below says why, with the right status
            w = h = 0
        if w * h > self.limits.max_image_pixels:
            raise exhausted(f"the {what} is {w}x{h} = {w * h} pixels; the limit is {self.limits.max_image_pixels}")
        return load_image(bytes(data))

    def text(self, value: str, what: str, required: bool = True) -> str:
        """``value`` stripped; INVALID_ARGUMENT when empty (and required) or longer than ``max_text_chars``."""
        if len(value) > self.limits.max_text_chars:
            raise invalid(f"the {what} is {len(value)} characters; the limit is {self.limits.max_text_chars}")
        if not value or not value.strip():
            if required:
                raise invalid(f"the {what} is empty")
            return ""
        return value.strip()

    def encode(self, question: str, image=None, answer: str | None = None, constraints=None) -> EncodedPrompt:
        """The prompt as the model sees it, within the prompt-token limit."""
        return encode(
            self.vlm.processor,
            question,
            image=image,
            answer=answer,
            constraints=constraints,
            max_tokens=self.max_prompt_tokens,
        )

    def new_tokens(self, asked: int) -> int:
        """Answer tokens for a request (0: the default), INVALID_ARGUMENT over the limit."""
        n = asked or self.limits.default_new_tokens
        if n > self.limits.max_new_tokens:
            raise invalid(f"max_new_tokens {n} is over the limit of {self.limits.max_new_tokens}")
        return n
