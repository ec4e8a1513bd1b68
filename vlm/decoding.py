"""Greedy decoding of a batch of prompts: one forward pass per step for all rows, each row leaving when done.

Batched serving (``server.batching``) gathers concurrent requests, of different
registry versions, into one ``greedy_batch`` call:

* rows are **left-padded** to the longest prompt; a row's position ids count its
  own tokens only (``cumsum`` of its attention mask), so every row sees the
  positions, the attention and hence the answer it would get alone;
* each row belongs to a **group** (a version): ``attach(group, rows)`` applies the
  group's edits to those rows of the batch only (``vlm.hooks.Rows``; every editor's
  ``attach(vlm, rows)``), and rows of group ``None`` run the base model;
* a row **leaves the batch** when it produces the end-of-sequence token, reaches
  its answer budget, or its ``cancelled()`` says so (a client that went away): its
  rows of the KV cache are dropped and every group's ``Rows`` re-indexed, so the
  remaining rows' steps get cheaper and the hooks keep editing the right rows;
* ``on_token`` receives each row's answer tokens as they are chosen (streaming).

This is static batching (the rows that start together decode together; a
request arriving meanwhile waits for the next batch), not iteration-level
scheduling of new rows into a running batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from .hooks import Rows
from .loading import VLM
from .positions import rows_of
from .prompts import EncodedPrompt, left_padded


@dataclass
class DecodeRow:
    """One prompt of a batch: its answer budget, its group (rows of one group share an attachment; ``None``:
    the base model), and optional callbacks for each chosen token and for cancellation."""

    prompt: EncodedPrompt
    new_tokens: int
    group: Hashable | None = None
    on_token: Callable[[int], None] | None = None
    cancelled: Callable[[], bool] | None = None


Attach = Callable[[Hashable, Rows], AbstractContextManager]


def _cache_argument(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` in recent transformers 5 releases,
    ``past_key_values`` before (and deprecated since)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def greedy_batch(vlm: VLM, rows: Sequence[DecodeRow], attach: Attach | None = None) -> list[list[int]]:
    """Greedy answers of every row (token ids, the end-of-sequence token included when produced; a cancelled
    row's answer stops where it left), decoded together: one forward pass per step over the rows still
    running. ``attach(group, rows)``: a context manager applying ``group``'s edits to ``rows`` of the batch
    (called once per group other than ``None``, for the whole batch)."""
    if not rows:
        return []
    if any(r.new_tokens < 1 for r in rows):
        raise ValueError("every row needs an answer budget of at least one token")
    eos = vlm.tokenizer.eos_token_id
    inputs = left_padded(vlm, [r.prompt for r in rows])
    active = list(range(len(rows)))  # the original row of each batch position
    groups = {r.group: Rows([]) for r in rows if r.group is not None}

    def reindex() -> None:  # each group's rows among the batch positions still running
        for key, rs in groups.items():
            rs.index = torch.tensor([b for b, i in enumerate(active) if rows[i].group == key], dtype=torch.long)

    reindex()
    answers: list[list[int]] = [[] for _ in rows]
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        if groups and attach is None:
            raise ValueError("rows name groups but no attach function was given")
        for key, sel in groups.items():
            stack.enter_context(attach(key, sel))
        mask = inputs["attention_mask"]
        position = inputs["position_ids"][..., -1:] + 1  # (B, 1), or (3, B, 1) for M-RoPE
        out = vlm.model(**inputs, use_cache=True, logits_to_keep=1)
        cache, cache_arg = _cache_of(out), _cache_argument(vlm.model)
        while True:
            chosen = out.logits[:, -1, :].argmax(-1)
            keep: list[int] = []
            for b, (i, token) in enumerate(zip(active, chosen.tolist())):
                answers[i].append(token)
                row = rows[i]
                if row.on_token is not None:
                    row.on_token(token)
                done = token == eos or len(answers[i]) >= row.new_tokens
                if not done and not (row.cancelled is not None and row.cancelled()):
                    keep.append(b)
            if not keep:
                return answers
            if len(keep) < len(active):  # finished or cancelled rows leave the batch
                sel = torch.tensor(keep, dtype=torch.long, device=mask.device)
                cache.batch_select_indices(sel)
                mask, position, chosen = mask[sel], rows_of(position, sel), chosen[sel]
                active = [active[b] for b in keep]
                reindex()
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = vlm.model(
                input_ids=chosen[:, None],
                attention_mask=mask,
                position_ids=position,
                use_cache=True,
                logits_to_keep=1,
                **{cache_arg: cache},
            )
            position = position + 1
