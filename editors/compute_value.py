"""MultEdit's value (Basu et al. §5, App. G; ROME's ``compute_v``): step 2 of a key/value edit.

z is the output of ``down_proj`` at the key position; the target is z* = z + δ,
with δ optimised by Adam to minimise −log P(O* | image, question),
teacher-forced over all answer tokens (optionally ‖δ‖ ≤ max_norm). Many
requests are optimised together in one batch: each row has its own δ at its own
position, and a row stops moving once it has converged, so a batch gives the
same values as one request at a time. Rows may share one δ (``groups``): facts
about one subject share its key, so they need one value that gives all their
answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vlm.loading import VLM
from vlm.patching import Patch, run_patched
from vlm.prompts import EncodedPrompt, collate

ProgressFn = Callable[[int, int, float], None]


def answer_nll(prompts: Sequence[EncodedPrompt], run) -> tuple[torch.Tensor, torch.Tensor]:
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


@dataclass
class Values:
    """The outcome of value optimisation, one row per request."""

    z: torch.Tensor  # (n, d) output of down_proj at the key position before the edit
    z_star: torch.Tensor  # (n, d) target output z + δ
    delta: torch.Tensor  # (n, d)
    steps: list[int]  # Adam steps each row took (0: already converged)
    prob: list[float]  # P(new answer) with δ added, at the end
    step_sizes: list[float]  # each row's Adam step size in δ units (lr × its scale)
    residual_rms: list[float]  # RMS of the residual stream at each key position


def optimise_values(
    vlm: VLM,
    prompts: Sequence[EncodedPrompt],
    layer: int,
    steps: int = 100,
    lr: float = 0.1,
    max_norm: float | None = None,
    target_prob: float = 0.9,
    lr_scale: str = "none",
    groups: Sequence[int] | None = None,
    progress: ProgressFn | None = None,
) -> Values:
    """Optimise δ for every prompt (encoded with its *new* answer) at once.

    Minimises −Σ log P(answer tokens) teacher-forced, with δ added to the
    output of ``down_proj`` at ``layer`` at the constraint's last token. A row
    stops (its δ is frozen) once P(new answer) ≥ ``target_prob`` with every
    answer token the argmax; all stop after ``steps`` Adam steps.

    ``lr_scale="residual"`` measures ``lr`` in units of the residual stream's
    RMS at the key position (layer ℓ's output): Adam moves every coordinate
    by about lr per step, so an absolute lr only suits models whose
    activations have the scale it was tuned on (the paper's 0.1: LLaVA-1.5-7B).

    ``groups[i]`` (default: every row its own) lets rows share one δ: rows
    about the same subject share a key, so a joint edit must write one value
    that gives all of their answers; a group stops when all its rows have.
    """
    if lr_scale not in ("none", "residual"):
        raise ValueError(f"lr_scale must be 'none' or 'residual', not {lr_scale!r}")
    for p in prompts:
        if not p.answer_positions:
            raise ValueError("value optimisation needs prompts encoded with the new answer")
    if steps < 0 or lr <= 0:
        raise ValueError("steps must be >= 0 and lr > 0")
    if max_norm is not None and max_norm <= 0:
        raise ValueError("max_norm must be positive")
    n = len(prompts)
    groups = list(range(n)) if groups is None else [int(g) for g in groups]
    if len(groups) != n or sorted(set(groups)) != list(range(len(set(groups)))):
        raise ValueError("groups must give every prompt a group number 0..G-1")
    G = len(set(groups))
    gidx = torch.tensor(groups)
    inputs = collate(prompts, vlm.tokenizer.pad_token_id)
    pos = [p.constraint_last for p in prompts]
    with torch.no_grad():
        run = run_patched(vlm, inputs, capture=[("mlp", layer), ("hidden", layer)])
    rows = torch.arange(n)
    z = run.captured[("mlp", layer)][rows, torch.tensor(pos)].float()
    resid = run.captured[("hidden", layer)][rows, torch.tensor(pos)].float()
    rms = resid.pow(2).mean(-1).sqrt().cpu()
    # δ = scale·ε with Adam on ε (one per group): each group's steps are lr × its scale
    row_scale = rms if lr_scale == "residual" else torch.ones(n)
    scale = torch.zeros(G).index_add(0, gidx, row_scale) / torch.bincount(gidx, minlength=G)
    scale = scale.to(z.device)[:, None]
    gidx = gidx.to(z.device)
    eps = torch.zeros(G, z.shape[1], device=z.device, requires_grad=True)
    opt = torch.optim.Adam([eps], lr=lr)
    done = torch.zeros(G, dtype=torch.bool, device=z.device)
    used = [0] * G
    threshold = -torch.log(torch.tensor(target_prob)).item()
    params = list(vlm.model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        nll = None
        for step in range(steps + 1):
            delta = (eps * scale)[gidx]
            patches = [Patch(i, "mlp", [pos[i]], delta[i : i + 1], layers=[layer], mode="add") for i in range(n)]
            run = run_patched(vlm, inputs, patches=patches, grad=step < steps)
            nll, top1 = answer_nll(prompts, run)
            row_ok = (top1 & (nll <= threshold)).detach()
            failing = torch.zeros(G, device=z.device).index_add(0, gidx, (~row_ok).float())
            done |= failing == 0
            if step == steps or bool(done.all()):
                break
            for i, d in enumerate(done.tolist()):
                used[i] += int(not d)
            frozen = eps.detach()[done].clone()
            opt.zero_grad()
            nll.sum().backward()
            opt.step()
            with torch.no_grad():
                if max_norm is not None:
                    norm = (eps * scale).norm(dim=-1, keepdim=True).clamp(min=1e-12)
                    eps.mul_(torch.clamp(max_norm / norm, max=1.0))
                eps[done] = frozen
            if progress:
                progress(step + 1, steps, float(nll.detach().mean()))
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    delta = (eps * scale).detach()[gidx]
    return Values(
        z=z,
        z_star=z + delta,
        delta=delta,
        steps=[used[g] for g in groups],
        prob=torch.exp(-nll.detach()).tolist(),
        step_sizes=(lr * scale[gidx, 0]).tolist(),
        residual_rms=rms.tolist(),
    )
