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
its own position, and a row stops moving once it has converged, so a batch
gives the same values as one request at a time); each update is still
computed for its own request, or jointly for n edits with an n×n solve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vlm.loading import VLM
from vlm.patching import Patch, run_patched
from vlm.prompts import EncodedPrompt, collate

ProgressFn = Callable[[int, int, float], None]


def constraint_keys(vlm: VLM, prompts: Sequence[EncodedPrompt], layer: int) -> torch.Tensor:
    """(n, d_ff) inputs of ``down_proj`` at ``layer`` at each prompt's constraint last token."""
    inputs = collate(prompts, vlm.tokenizer.pad_token_id)
    run = run_patched(vlm, inputs, capture=[("mlp_in", layer)])
    x = run.captured[("mlp_in", layer)]
    pos = torch.tensor([p.constraint_last for p in prompts], device=x.device)
    return x[torch.arange(len(prompts), device=x.device), pos].float()


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


def rank_one(
    W: torch.Tensor, k: torch.Tensor, z_star: torch.Tensor, lam: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u, v) of the closed-form update: W′ + u vᵀ with u = (z* − W′k)/(λ + kᵀk), v = k."""
    W = W.float()
    k = k.float()
    u = (z_star.float() - W @ k) / (lam + k @ k)
    return u, k.clone()


def solve_update(Wk: torch.Tensor, K: torch.Tensor, Z_star: torch.Tensor, lam: float = 0.01) -> torch.Tensor:
    """U of the joint update W′ + U Kᵀ = W′ + (Z − W′K)(λIₙ + KᵀK)⁻¹Kᵀ for n keys at once.

    Rows are edits: ``Wk`` (n, d) = W′k_i (the module's current output at
    each key), ``K`` (n, d_ff), ``Z_star`` (n, d). Returns U (d, n); the
    delta is U Kᵀ, i.e. V = Kᵀ columns. Only an n×n system is solved (in
    float64); for n = 1 this is exactly ``rank_one``.
    """
    K64 = K.double()
    A = lam * torch.eye(K.shape[0], dtype=torch.float64, device=K.device) + K64 @ K64.T
    R = Z_star.double() - Wk.double()
    return torch.linalg.solve(A, R).T.float()


def solve_update_keeping(
    Wk: torch.Tensor, K: torch.Tensor, Z_star: torch.Tensor, K_keep: torch.Tensor, lam: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint update when other keys must keep their outputs (earlier edits in sequential editing).

    Minimises Σᵢ ‖(W′ + Δ)kᵢ − z*ᵢ‖² + Σⱼ ‖Δ k_keep,ⱼ‖² + λ‖Δ‖², the paper's
    objective over the new and the kept keys together: with Kf = [K; K_keep]
    and R = [Z* − W′K; 0], Δ = Rᵀ(λI + Kf Kfᵀ)⁻¹Kf, an (n+m)×(n+m) solve.
    Only the n new rows of R are non-zero, so Δ = U Vᵀ with U = (Z* − W′K)ᵀ
    (d × n) and V = ((λI + Kf Kfᵀ)⁻¹Kf)[:n]ᵀ (d_ff × n): still rank n.
    """
    n = K.shape[0]
    Kf = torch.cat([K, K_keep.to(K.device, K.dtype)]).double()
    A = lam * torch.eye(Kf.shape[0], dtype=torch.float64, device=Kf.device) + Kf @ Kf.T
    rows = torch.linalg.solve(A, Kf)[:n]
    return (Z_star.double() - Wk.double()).T.float(), rows.T.float()


def explicit_inverse_update(W: torch.Tensor, K: torch.Tensor, Z_star: torch.Tensor, lam: float = 0.01) -> torch.Tensor:
    """The paper's formula (App. G eq. 7), as the authors compute it: the edited weight
    (λW′ + Z Kᵀ)(λI + K Kᵀ)⁻¹ with a d_ff×d_ff inverse. A reference, not for use."""
    K = K.T if K.dim() == 2 else K[:, None]  # (d_ff, n)
    Z = Z_star.T if Z_star.dim() == 2 else Z_star[:, None]
    eye = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
    return (lam * W + Z @ K.T) @ torch.linalg.inv(lam * eye + K @ K.T)
