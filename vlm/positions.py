"""Each token's rotary position, by the family's own rule: 1-D (LLaVA, LLaVA-NeXT) or M-RoPE's (time,
height, width) triples (Qwen2-VL), where an image's tokens take positions on its patch grid and the text
after it continues from the grid's largest position, not from the token index.

Every path that runs the language model by itself — the diagnostics' prefix cache and suffix runs, batched
decoding — takes its positions from here, computed from the prompt and passed explicitly, so they never
depend on state a model keeps between calls (Qwen2-VL keeps its last ``rope_deltas`` on the module, which
concurrent requests would share).
"""

from __future__ import annotations

import torch


def position_ids(vlm, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Positions of a batch from ``collate`` or ``left_padded``: ``(B, T)`` for a 1-D family (each row's real
    tokens 0, 1, 2, …; padding 0), ``(3, B, T)`` for an M-RoPE family (the model's ``get_rope_index``)."""
    mask = inputs["attention_mask"]
    if vlm.arch.rope == "mrope":
        model = vlm.arch.get(vlm.model, vlm.arch.base_model)
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = torch.zeros_like(inputs["input_ids"])
        pos, _ = model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=types,
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=mask,
        )
        return pos
    return (mask.cumsum(1) - 1).clamp(min=0)


def rows_of(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows ``index`` of a batch's positions (the batch dimension is the second to last)."""
    return positions[..., index, :]


def span(positions: torch.Tensor, start: int, end: int, rows: int) -> torch.Tensor:
    """Token positions ``start..end-1`` of a one-row ``positions`` for ``rows`` rows."""
    part = positions[..., start:end]
    return part.expand(*part.shape[:-2], rows, end - start)
