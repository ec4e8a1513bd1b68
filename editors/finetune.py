"""FT-L, the fine-tuning baseline (Zhu et al. 2020, as ROME's FT-L): fine-tune
the same ``down_proj`` MultEdit edits, with the same loss, so every MultEdit
figure has a comparison.

The trainable object is a dense ΔW (d × d_ff) added to the module's output at
every position (x ΔWᵀ), optimised with Adam to minimise −log P(O* | image,
question) teacher-forced over all answer tokens, optionally with ROME's
L∞ bound on the entries of ΔW. Like MultEdit's values, a request stops once
P(O*) ≥ ``target_prob`` with every answer token the argmax.

Independent edits are trained side by side in one batch, each row with its
own ΔW (a row's loss reaches only its own ΔW), which is the same as
training them one at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from vlm.loading import VLM
from vlm.prompts import EncodedPrompt, collate
from vlm.patching import run_patched

from .edit_set import attach
from .request import DownProjEditor, EditProgress, EditRequest, ProgressCallback
from .rank_one import answer_nll


@dataclass
class DenseDelta:
    """ΔW on the linear module at ``module``: adds x ΔWᵀ to its output."""

    layer: int
    module: str
    W: torch.Tensor  # (d_out, d_in)

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.W.to(x.device, torch.float32).T


class _RowwiseDelta:
    """One ΔW per batch row, trainable (used only while fine-tuning a batch)."""

    def __init__(self, module: str, W: torch.Tensor):
        self.module = module
        self.W = W  # (n, d_out, d_in)

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btf,bdf->btd", x.float(), self.W)


@dataclass
class FineTuneConfig:
    layer: int
    steps: int = 100
    lr: float = 1e-3
    max_change: float | None = None   # L∞ bound on the entries of ΔW (None: unbounded)
    target_prob: float = 0.95

    def check(self, vlm: VLM) -> None:
        if not 0 <= self.layer < vlm.num_layers:
            raise ValueError(f"layer {self.layer} is outside 0..{vlm.num_layers - 1}")
        if self.steps < 0 or self.lr <= 0:
            raise ValueError("steps must be >= 0 and lr > 0")
        if self.max_change is not None and self.max_change <= 0:
            raise ValueError("max_change must be positive")


class FineTune(DownProjEditor):
    name = "ft"

    def __init__(self, vlm: VLM, config: FineTuneConfig):
        super().__init__(vlm, config)
        self.shape = tuple(vlm.module(self.module).weight.shape)

    def edit_each(self, requests: Sequence[EditRequest], batch_size: int = 16,
                  progress: ProgressCallback | None = None) -> list[list[DenseDelta]]:
        """Independent fine-tunes, each from the current model; one list of deltas per request."""
        out: list[list[DenseDelta]] = []
        for start in range(0, len(requests), batch_size):
            chunk = list(requests[start: start + batch_size])
            W0 = torch.zeros(len(chunk), *self.shape)
            W, _ = self._train([self.encode(r) for r in chunk], W0, progress, start, len(requests))
            out += [[DenseDelta(self.config.layer, self.module, W[i])] for i in range(len(chunk))]
        return out

    def edit_sequentially(self, requests: Sequence[EditRequest], onto: Sequence[DenseDelta] = (),
                          progress: ProgressCallback | None = None) -> list[DenseDelta]:
        """One ΔW, fine-tuned on each request in turn, starting from ``onto`` (earlier FT-L edits)."""
        W = sum((d.W for d in onto if d.module == self.module), torch.zeros(*self.shape))
        others = [d for d in onto if d.module != self.module]
        for i, req in enumerate(requests):
            with attach(self.vlm, others):
                W_new, _ = self._train([self.encode(req)], W[None], progress, i, len(requests))
            W = W_new[0]
        return others + [DenseDelta(self.config.layer, self.module, W)]

    def _train(self, prompts: list[EncodedPrompt], W0: torch.Tensor, progress: ProgressCallback | None,
               first: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, vlm, n = self.config, self.vlm, len(prompts)
        say = progress or (lambda e: None)
        device = vlm.input_device
        inputs = collate(prompts, vlm.tokenizer.pad_token_id)
        W = W0.clone().to(device).requires_grad_(True)
        opt = torch.optim.Adam([W], lr=cfg.lr)
        threshold = -torch.log(torch.tensor(cfg.target_prob)).item()
        done = torch.zeros(n, dtype=torch.bool, device=device)
        t0 = time.perf_counter()
        delta = _RowwiseDelta(self.module, W)
        with attach(vlm, [delta]):
            for step in range(cfg.steps + 1):
                run = run_patched(vlm, inputs, grad=step < cfg.steps)
                nll, top1 = answer_nll(prompts, run)
                done |= (top1 & (nll <= threshold)).detach()
                if step == cfg.steps or bool(done.all()):
                    break
                frozen = W.detach()[done].clone()
                opt.zero_grad()
                nll.sum().backward()
                opt.step()
                with torch.no_grad():
                    if cfg.max_change is not None:
                        W.clamp_(-cfg.max_change, cfg.max_change)
                    W[done] = frozen
                say(EditProgress("value", first, total, step + 1, cfg.steps, float(nll.detach().mean())))
        return W.detach().cpu(), {"seconds": time.perf_counter() - t0}
