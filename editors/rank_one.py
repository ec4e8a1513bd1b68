"""The core of MultEdit (Basu et al. §5, App. G): key, value optimisation and
the closed-form rank-one update of one MLP's down projection.

* Key k ∈ R^{d_ff}: the input of ``down_proj`` at layer ℓ at the last token
  of the visual constraint ("this landmark"), one forward pass.
* Value: z = the output of ``down_proj`` there; z* = z + δ, with δ optimised
  by Adam to minimise −log P(O* | image, question), teacher-forced over all
  answer tokens. Optionally ‖δ‖ ≤ max_norm (None: unbounded).
* Update: W* = argmin ‖W k − z*‖² + λ‖W − W′‖², which is exactly the rank
  one W′ + (z* − W′k) kᵀ / (λ + kᵀk); stored as factors u = (z* − W′k) /
  (λ + kᵀk) ∈ R^d and v = k ∈ R^{d_ff}. No d_ff×d_ff matrix is formed.

Many requests are optimised together in one batch (each row has its own δ at
its own position); each update is still computed for its own request.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from vlm.loading import VLM
from vlm.patching import Patch, run_patched
from vlm.prompts import EncodedPrompt, collate

ProgressFn = Callable[[int, int, float], None]


@dataclass
class RankOne:
    """W′ + u vᵀ on the ``down_proj`` of ``layer``."""

    layer: int
    u: torch.Tensor   # (d,)
    v: torch.Tensor   # (d_ff,)


def constraint_keys(vlm: VLM, prompts: Sequence[EncodedPrompt], layer: int) -> torch.Tensor:
    """(n, d_ff) inputs of ``down_proj`` at ``layer`` at each prompt's constraint last token."""
    inputs = collate(prompts, vlm.tokenizer.pad_token_id)
    run = run_patched(vlm, inputs, capture=[("mlp_in", layer)])
    x = run.captured[("mlp_in", layer)]
    pos = torch.tensor([p.constraint_last for p in prompts], device=x.device)
    return x[torch.arange(len(prompts), device=x.device), pos].float()


def _answer_nll(vlm: VLM, prompts: Sequence[EncodedPrompt], run) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row −Σ log P(answer tokens) and whether every answer token is the argmax."""
    rows, pos, tgt = [], [], []
    for i, p in enumerate(prompts):
        for a in p.answer_positions:
            rows.append(i)
            pos.append(a - 1)
            tgt.append(int(p.input_ids[a]))
    logp = torch.log_softmax(run.logits_at(rows, pos), dim=-1)
    t = torch.tensor(tgt, device=logp.device)
    r = torch.tensor(rows, device=logp.device)
    tok_nll = -logp.gather(1, t[:, None])[:, 0]
    nll = torch.zeros(len(prompts), device=logp.device).index_add(0, r, tok_nll)
    wrong = torch.zeros(len(prompts), device=logp.device).index_add(0, r, (logp.argmax(-1) != t).float())
    return nll, wrong == 0


def optimise_values(vlm: VLM, prompts: Sequence[EncodedPrompt], layer: int, steps: int = 100, lr: float = 0.1,
                    max_norm: float | None = None, target_prob: float = 0.9,
                    progress: ProgressFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise δ for every prompt (encoded with its *new* answer) at once.

    Returns (z*, δ), each (n, d): the target output of ``down_proj`` at the
    constraint's last token and the change that gets there. Stops early once
    every row puts P(new answer) ≥ ``target_prob`` with every token top-1.
    """
    for p in prompts:
        if not p.answer_positions:
            raise ValueError("value optimisation needs prompts encoded with the new answer")
    inputs = collate(prompts, vlm.tokenizer.pad_token_id)
    pos = [p.constraint_last for p in prompts]
    with torch.no_grad():
        base = run_patched(vlm, inputs, capture=[("mlp", layer)]).captured[("mlp", layer)]
    z = base[torch.arange(len(prompts)), torch.tensor(pos)].float()
    delta = torch.zeros_like(z, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    params = list(vlm.model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        for step in range(steps):
            patches = [Patch(i, "mlp", [pos[i]], delta[i: i + 1], layers=[layer], mode="add")
                       for i in range(len(prompts))]
            run = run_patched(vlm, inputs, patches=patches, grad=True)
            nll, top1 = _answer_nll(vlm, prompts, run)
            if bool((top1 & (nll <= -torch.log(torch.tensor(target_prob)))).all()):
                break
            opt.zero_grad()
            nll.sum().backward()
            opt.step()
            if max_norm is not None:
                with torch.no_grad():
                    norm = delta.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                    delta.mul_(torch.clamp(max_norm / norm, max=1.0))
            if progress:
                progress(step + 1, steps, float(nll.mean()))
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    delta = delta.detach()
    return z + delta, delta


def rank_one(W: torch.Tensor, k: torch.Tensor, z_star: torch.Tensor, lam: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u, v) of the closed-form update: W′ + u vᵀ with u = (z* − W′k)/(λ + kᵀk), v = k."""
    W = W.float()
    k = k.float()
    u = (z_star.float() - W @ k) / (lam + k @ k)
    return u, k.clone()


@contextlib.contextmanager
def applied(vlm: VLM, updates: Sequence[RankOne]) -> Iterator[None]:
    """Apply rank-one updates for the duration; the original weights come back bit for bit."""
    saved = []
    try:
        with torch.no_grad():
            for upd in updates:
                lin = vlm.module(vlm.arch.module_path("down_proj", upd.layer))
                saved.append((lin, lin.weight.detach().clone()))
                w = lin.weight
                delta = torch.outer(upd.u.to(w.device, torch.float32), upd.v.to(w.device, torch.float32))
                w.add_(delta.to(w.dtype))
        yield
    finally:
        with torch.no_grad():
            for lin, w0 in reversed(saved):
                lin.weight.copy_(w0)
