"""Prompt encoding with the token spans that editors and diagnostics need.

(image, question, optional answer, optional constraints) → token ids, pixel
values and: the image tokens' runs (one, or one per crop where a family
splits an image), each constraint's token span (found through character
offsets, so it works for any fast tokenizer), the last prompt position
(whose logits predict the first answer token) and the answer token
positions. Batches are right-padded so that a token's index is the same
position in every row's sequence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import ConstraintNotFoundError, PromptError
from .images import ImageInput, ProcessedImage, batch_images, from_pixels, process_image
from .positions import position_ids

Span = tuple[int, int]  # [start, end) token positions


@dataclass
class EncodedPrompt:
    input_ids: torch.Tensor  # (T,) long
    image: ProcessedImage | None  # None for a text-only prompt
    question: str
    text: str  # the full prompt text (image placeholder not expanded)
    image_spans: list[Span]  # the image tokens' runs: one, or one per crop where Idefics3 splits an image
    constraint_spans: list[Span]
    last_prompt_pos: int  # logits here predict the first answer token
    answer: str | None = None
    answer_positions: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def answer_ids(self) -> list[int]:
        return [int(self.input_ids[p]) for p in self.answer_positions]

    @property
    def constraint_last(self) -> int:
        """Last token of the first (visual) constraint: where MultEdit edits."""
        if not self.constraint_spans:
            raise PromptError(f"no constraint was given for the question {self.question!r}")
        return self.constraint_spans[0][1] - 1

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return None if self.image is None else self.image.pixel_values

    @property
    def image_span(self) -> Span | None:
        """From the first image token to the last (markers between an image's runs included); None without an
        image. Its end is the first position after the image."""
        return (self.image_spans[0][0], self.image_spans[-1][1]) if self.image_spans else None

    @property
    def image_grid(self) -> tuple[int, int] | None:
        """(rows, columns) to lay the image tokens out on: the image's own token grid where it has one
        (Qwen2-VL's merged patches), else square when the count is a square (LLaVA-1.5's patch grid), else one
        row (tiles and crops); None without an image."""
        n = len(self.image_positions)
        if not n:
            return None
        own = self.image.grid if self.image is not None else None
        return own if own and own[0] * own[1] == n else token_grid(n)

    @property
    def image_positions(self) -> list[int]:
        """The positions of the image tokens (the model fills these with image features), in order."""
        return [i for a, b in self.image_spans for i in range(a, b)]


def token_grid(n: int) -> tuple[int, int]:
    """(rows, columns) for ``n`` image tokens with no grid of their own: square when ``n`` is a square
    (LLaVA-1.5's patch grid), else one row."""
    side = int(round(n**0.5))
    return (side, side) if side * side == n else (1, n)


def prompt_text(processor, question: str, with_image: bool) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return ("USER: <image>\n" if with_image else "USER: ") + question + " ASSISTANT:"


def _tokenize(tok, full: str, image: ProcessedImage | None, img_id: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``full``. Each run of image tokens (576 for LLaVA-1.5; one per crop
    where Idefics3 splits an image) is tokenized as one token and spliced back: the image token is a special
    token, which the tokenizer splits around, so the ids are those of the whole string, and tokenizing a prompt
    costs what its text costs."""

    def whole(text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    if image is None or image.num_tokens <= 1:
        return whole(full)
    runs = list(re.finditer(f"(?:{re.escape(image.token)})+", full))
    w = len(image.token)
    lengths = [(m.end() - m.start()) // w for m in runs]
    collapsed, at = [], 0
    for m in runs:
        collapsed += [full[at : m.start()], image.token]
        at = m.end()
    ids, offsets = whole("".join(collapsed) + full[at:])
    where = [i for i, t in enumerate(ids) if t == img_id]
    if len(where) != len(runs):  # not split around as a special token would be: tokenize it whole
        return whole(full)
    out_ids: list[int] = []
    out_offsets: list[tuple[int, int]] = []
    extra, prev = 0, 0  # characters the runs so far lost in the collapsed text
    for i, n in zip(where, lengths):
        out_ids += ids[prev:i]
        out_offsets += [(a + extra, b + extra) if b > 0 else (a, b) for a, b in offsets[prev:i]]
        start = offsets[i][0] + extra
        out_ids += [img_id] * n
        out_offsets += [(start + k * w, start + (k + 1) * w) for k in range(n)]
        extra += (n - 1) * w
        prev = i + 1
    out_ids += ids[prev:]
    out_offsets += [(a + extra, b + extra) if b > 0 else (a, b) for a, b in offsets[prev:]]
    return out_ids, out_offsets


def _runs(positions: list[int]) -> list[Span]:
    """Sorted positions as the spans of their consecutive runs."""
    spans: list[Span] = []
    for p in positions:
        if spans and spans[-1][1] == p:
            spans[-1] = (spans[-1][0], p + 1)
        else:
            spans.append((p, p + 1))
    return spans


def _char_span_to_tokens(offsets: list[tuple[int, int]], start: int, end: int, skip: set[int]) -> list[int]:
    return [i for i, (a, b) in enumerate(offsets) if i not in skip and b > a and a < end and b > start]


def encode(
    processor,
    question: str,
    image: ImageInput | ProcessedImage | None = None,
    answer: str | None = None,
    constraints: Sequence[str] | str | None = None,
    max_tokens: int | None = None,
    pixel_values: torch.Tensor | ProcessedImage | None = None,
) -> EncodedPrompt:
    """Encode one prompt. ``image`` may be given already processed (a ``ProcessedImage``, from
    ``vlm.images.process_image``; reuse one for many prompts of the same image); ``pixel_values`` (a
    ``ProcessedImage`` or a fixed-resolution family's ``(3, H, W)`` tensor) replaces ``image``."""
    if not isinstance(question, str) or not question.strip():
        raise PromptError("the question is empty")
    if answer is not None and not answer.strip():
        raise PromptError("the answer is empty")
    if isinstance(constraints, str):
        constraints = [constraints]
    tok = processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    if image_token in question:
        raise PromptError(f"the question must not contain the image placeholder {image_token!r}")
    if answer is not None and image_token in answer:
        raise PromptError(f"the answer must not contain the image placeholder {image_token!r}")
    processed = None
    if pixel_values is not None:
        processed = pixel_values if isinstance(pixel_values, ProcessedImage) else from_pixels(processor, pixel_values)
    elif image is not None:
        processed = process_image(processor, image)
    with_image = processed is not None
    text = prompt_text(processor, question, with_image)
    q_at = text.find(question)
    if q_at < 0:
        raise PromptError("the chat template changed the question text; cannot locate it in the prompt")
    expanded, shift = text, 0
    if with_image:
        n_img = processed.num_tokens
        at = text.find(image_token)
        expanded = text[:at] + processed.expansion + text[at + len(image_token) :]
        shift = len(processed.expansion) - len(image_token) if at < q_at else 0
    q_start = q_at + shift
    full = expanded if answer is None else expanded + " " + answer.strip()
    img_id = tok.convert_tokens_to_ids(processed.token) if with_image else -1
    ids, offsets = _tokenize(tok, full, processed, img_id)
    special_ids = set(tok.all_special_ids) - {img_id}
    special = {i for i, t in enumerate(ids) if t in special_ids}

    image_spans: list[Span] = []
    if with_image:
        pos = [i for i, t in enumerate(ids) if t == img_id]
        if len(pos) != n_img:
            raise PromptError(f"expected {n_img} image tokens for this image, found {len(pos)}")
        image_spans = _runs(pos)
        special |= set(pos)

    spans: list[Span] = []
    for c in constraints or []:
        if not c or not c.strip():
            raise PromptError("a constraint is empty")
        at = question.lower().find(c.lower())
        if at < 0:
            raise ConstraintNotFoundError(f"the constraint {c!r} does not occur in the question {question!r}")
        toks = _char_span_to_tokens(offsets, q_start + at, q_start + at + len(c), special)
        if not toks:
            raise ConstraintNotFoundError(f"the constraint {c!r} covers no token of the question")
        spans.append((toks[0], toks[-1] + 1))

    if answer is not None:
        a_start = len(expanded) + 1
        answer_positions = _char_span_to_tokens(offsets, a_start, len(full), special)
        if not answer_positions:
            raise PromptError(f"the answer {answer!r} encodes to no tokens")
        last = answer_positions[0] - 1
    else:
        answer_positions, last = [], len(ids) - 1
    if max_tokens is not None and len(ids) > max_tokens:
        raise PromptError(f"the prompt is {len(ids)} tokens long; the limit is {max_tokens}")
    return EncodedPrompt(
        input_ids=torch.tensor(ids, dtype=torch.long),
        image=processed,
        question=question,
        text=text,
        image_spans=image_spans,
        constraint_spans=spans,
        last_prompt_pos=last,
        answer=answer,
        answer_positions=answer_positions,
    )


def token_type_inputs(prompts: Sequence[EncodedPrompt], length: int, left: bool) -> dict[str, torch.Tensor]:
    """The per-token image marks some families take beside the ids (Qwen2-VL's ``mm_token_type_ids``: 1 on
    image tokens, 0 elsewhere), as ``{name: (rows, length)}`` for a right- or left-padded batch; empty for a
    family that takes none."""
    name = next((p.image.token_types for p in prompts if p.image is not None and p.image.token_types), None)
    if name is None:
        return {}
    marks = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, p in enumerate(prompts):
        pad = length - p.length if left else 0
        for a, b in p.image_spans:
            marks[row, pad + a : pad + b] = 1
    return {name: marks}


def collate(
    prompts: Sequence[EncodedPrompt], pad_id: int, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a batch into model inputs (input_ids, attention_mask and the image rows' tensors in row
    order: pixel_values, plus image_sizes for a tiling family)."""
    if not prompts:
        raise PromptError("empty batch")
    T = max(p.length for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : p.length] = p.input_ids
        mask[i, : p.length] = 1
    out = {"input_ids": ids, "attention_mask": mask, **token_type_inputs(prompts, T, left=False)}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    images = [p.image for p in prompts if p.image is not None]
    if images:
        out.update(batch_images(images, device, dtype))
    return out


def left_padded(vlm, prompts: Sequence[EncodedPrompt]) -> dict[str, torch.Tensor]:
    """Left-pad a batch into ``vlm``'s inputs for generation: input_ids, attention_mask, position_ids (each
    row's own positions over its real tokens: 0, 1, 2, … or the family's M-RoPE triples) and the image rows'
    tensors in row order, on its device."""
    if not prompts:
        raise PromptError("empty batch")
    T = max(p.length for p in prompts)
    ids = torch.full((len(prompts), T), vlm.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - p.length :] = p.input_ids
        mask[i, T - p.length :] = 1
    dev = vlm.input_device
    out = {"input_ids": ids, "attention_mask": mask, **token_type_inputs(prompts, T, left=True)}
    out = {k: v.to(dev) for k, v in out.items()}
    images = [p.image for p in prompts if p.image is not None]
    if images:
        out.update(batch_images(images, dev, vlm.dtype))
    out["position_ids"] = position_ids(vlm, out)
    return out
