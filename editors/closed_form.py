"""The closed-form updates of a key/value edit (Basu et al. App. G eq. 7; ROME's rank-one step): step 3.

For keys K (n × d_ff) and targets Z* (n × d) at a linear layer W′,
W* = argmin Σᵢ ‖W kᵢ − z*ᵢ‖² + λ‖W − W′‖² is W′ + Rᵀ(λIₙ + KKᵀ)⁻¹K with
R = Z* − KW′ᵀ (each row a key's residual):
only an n×n system is solved, and no d_ff×d_ff matrix is formed. Every update
is returned as factors U (d × n) and V (d_ff × n), the delta being U Vᵀ.

* ``rank_one_updates``: n *independent* single edits at once, one rank-one
  column each, u = (z* − W′k)/(λ + kᵀk), v = k — what MultEdit's single edits
  and the bench's many cases use;
* ``solve_update``: one joint update of n edits (for n = 1 the same column);
* ``solve_update_keeping``: the joint update that also keeps other keys'
  outputs (earlier edits in sequential editing; AlphaEdit on projected keys);
* ``explicit_inverse_update``: the paper's formula with its d_ff×d_ff inverse,
  a reference for tests and ``bench update`` only.
"""

from __future__ import annotations

import torch


def rank_one_updates(Wk: torch.Tensor, K: torch.Tensor, Z_star: torch.Tensor, lam: float = 0.01) -> torch.Tensor:
    """U (d, n) of n independent rank-one updates: column i is uᵢ = (z*ᵢ − W′kᵢ)/(λ + kᵢᵀkᵢ), its vᵢ = kᵢ.

    Rows are edits: ``Wk`` (n, d) = W′kᵢ (the module's current output at each key), ``K`` (n, d_ff),
    ``Z_star`` (n, d). Edit i alone is W′ + uᵢkᵢᵀ; the columns are never summed into one update here."""
    K = K.float()
    return ((Z_star.float() - Wk.float()) / (lam + (K * K).sum(-1, keepdim=True))).T


def solve_update(Wk: torch.Tensor, K: torch.Tensor, Z_star: torch.Tensor, lam: float = 0.01) -> torch.Tensor:
    """U of the joint update W′ + U Kᵀ = W′ + (Z − W′K)(λIₙ + KᵀK)⁻¹Kᵀ for n keys at once.

    Rows are edits: ``Wk`` (n, d) = W′k_i (the module's current output at
    each key), ``K`` (n, d_ff), ``Z_star`` (n, d). Returns U (d, n); the
    delta is U Kᵀ, i.e. V = Kᵀ columns. Only an n×n system is solved (in
    float64); for n = 1 this is exactly ``rank_one_updates``.
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
