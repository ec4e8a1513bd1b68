"""The one engine under every diagnostic: many intervention cells of one prompt, batched.

A ``Cell`` is one intervened forward pass of the prepared prompt: patches
(restore / add / overwrite states), attention knockouts, and optionally one
state to read back. ``CellRunner.run`` returns, per cell, P(O) at the last
prompt position and the state read.

``mode="batched"`` (the default):
* the input embeddings (vision tower and projector included) are computed
  once; cells differ only through their interventions;
* the unchanged prefix — every position before the first one any cell
  touches (patch positions, knockout targets) — is run once and its
  key/value cache reused by every batch: under causal attention those
  positions cannot see any intervention;
* cells run ``batch_size`` rows per forward pass; a pass whose cells only
  read states stops after the deepest layer they read.

``mode="uncached"`` is the batched engine without the prefix cache (to
measure what the cache brings).

``mode="naive"`` is the reference: one full forward pass of the whole model
per cell, no cache, no batching. Both give the same numbers (tests, to
1e-5 in fp32); ``bench diagnostics`` times them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from vlm.images import TOKEN_TYPE_KEYS
from vlm.loading import VLM
from vlm.patching import Knockout, Patch, PrefixCache, run_patched, run_suffix
from vlm.positions import position_ids
from vlm.prompts import EncodedPrompt, collate

from .errors import DiagnosticError

MODES = ("batched", "uncached", "naive")
Progress = Callable[[int, int], None]  # (cells done, cells total)


@dataclass
class Cell:
    patches: Sequence[Patch] = ()  # their ``row`` is ignored
    knockouts: Sequence[Knockout] = ()  # their ``row`` is ignored
    read: tuple[str, int, int] | None = None  # (kind, layer, position) to return

    def first_position(self) -> int | None:
        """The first position any intervention of the cell touches (None: none); the prefix before it can be shared."""
        pos = [int(q) for p in self.patches for q in p.positions]
        pos += [int(t) for k in self.knockouts for t in k.targets]
        if self.read:  # a read state must be computed in the pass, not taken from the prefix
            pos.append(int(self.read[2]))
        return min(pos) if pos else None


@dataclass
class CellResults:
    probs: torch.Tensor  # (n,) P(O) per cell (empty if not asked)
    reads: list[torch.Tensor] = field(default_factory=list)
    forward_passes: int = 0


class CellRunner:
    """Runs cells of one prompt: batched over a cached prefix, or naively one by one."""

    def __init__(
        self,
        vlm: VLM,
        prompt: EncodedPrompt,
        target_id: int | None,
        mode: str = "batched",
        batch_size: int = 64,
        embeds: torch.Tensor | None = None,
    ):
        if mode not in MODES:
            raise DiagnosticError(f"engine mode must be one of {MODES}, not {mode!r}")
        if batch_size < 1:
            raise DiagnosticError("batch size must be at least 1")
        self.vlm, self.prompt, self.target_id = vlm, prompt, target_id
        self.mode, self.batch_size = mode, batch_size
        self.inputs = collate([prompt], vlm.tokenizer.pad_token_id)
        self.positions = position_ids(vlm, self.inputs)
        self.token_inputs = {k: v for k, v in self.inputs.items() if k in TOKEN_TYPE_KEYS}
        self._embeds = embeds

    @property
    def embeds(self) -> torch.Tensor:
        """(1, T, d) language-model input embeddings, image features in place; computed once."""
        if self._embeds is None:
            run = run_patched(self.vlm, self.inputs, capture=[("embeds", -1)], stop_after_layer=0)
            self._embeds = run.captured[("embeds", -1)]
        return self._embeds

    def _prob(self, run, rows: int) -> torch.Tensor:
        logits = run.logits_at(list(range(rows)), [self.prompt.last_prompt_pos] * rows)
        return torch.softmax(logits, dim=-1)[:, self.target_id]

    def run(self, cells: Sequence[Cell], progress: Progress | None = None) -> CellResults:
        """P(target) of every cell, batched over a shared cached prefix (or one pass per cell, ``naive``)."""
        if not cells:
            return CellResults(probs=torch.zeros(0))
        if self.mode == "naive":
            return self._run_naive(cells, progress)
        return self._run_batched(cells, progress)

    def _run_naive(self, cells: Sequence[Cell], progress: Progress | None) -> CellResults:
        probs, reads = [], []
        for i, c in enumerate(cells):
            capture = [c.read[:2]] if c.read else []
            run = run_patched(
                self.vlm,
                self.inputs,
                patches=[replace(p, row=0) for p in c.patches],
                knockouts=[replace(k, row=0) for k in c.knockouts],
                capture=capture,
            )
            if self.target_id is not None:
                probs.append(self._prob(run, 1))
            if c.read:
                reads.append(run.captured[c.read[:2]][0, c.read[2]])
            if progress:
                progress(i + 1, len(cells))
        return CellResults(probs=torch.cat(probs) if probs else torch.zeros(0), reads=reads, forward_passes=len(cells))

    def _run_batched(self, cells: Sequence[Cell], progress: Progress | None) -> CellResults:
        firsts = [c.first_position() for c in cells]
        touched = [f for f in firsts if f is not None]
        P = min(touched) if touched else self.prompt.last_prompt_pos
        span = self.prompt.image_span
        if self.vlm.arch.image_attention == "bidirectional" and span is not None and P < span[1]:
            P = 0  # image tokens that attend both ways are computed together: no prefix that splits them
        prefix = (
            PrefixCache.build(self.vlm, self.embeds, P, self.positions, self.token_inputs)
            if P > 0 and self.mode == "batched"
            else None
        )
        probs, reads, passes = [], [], 0
        for start in range(0, len(cells), self.batch_size):
            chunk = cells[start : start + self.batch_size]
            n = len(chunk)
            patches = [replace(p, row=r) for r, c in enumerate(chunk) for p in c.patches]
            knockouts = [replace(k, row=r) for r, c in enumerate(chunk) for k in c.knockouts]
            capture = list({c.read[:2] for c in chunk if c.read})
            stop = None
            if self.target_id is None and capture:
                stop = max(layer for _, layer in capture)
            embeds = self.embeds.expand(n, -1, -1)
            run = run_suffix(
                self.vlm,
                embeds,
                prefix,
                patches=patches,
                capture=capture,
                knockouts=knockouts,
                stop_after_layer=stop,
                positions=self.positions,
                token_inputs=self.token_inputs,
            )
            passes += 1
            if self.target_id is not None:
                probs.append(self._prob(run, n))
            for r, c in enumerate(chunk):
                if c.read:
                    t = run.captured[c.read[:2]]
                    reads.append(t[r, c.read[2] - (P if prefix is not None else 0)])
            if progress:
                progress(start + n, len(cells))
        return CellResults(probs=torch.cat(probs) if probs else torch.zeros(0), reads=reads, forward_passes=passes)
