"""``editlens bench update``: the rank-one closed form against the paper's explicit inverse.

On one ``down_proj`` of LLaVA-1.5-7B's size (d = 4096, d_ff = 11008) with
random weights, keys and values, both ways of computing the edited weight:

* naive — the formula as the authors compute it: (λW′ + z*kᵀ)(λI + kkᵀ)⁻¹,
  a d_ff×d_ff inverse and a d×d_ff×d_ff product;
* ours — u = (z* − W′k)/(λ + kᵀk), W′ + u kᵀ (and for n edits the n×n solve).

Both produce the full edited weight, so the work compared is equal. Beside
the times: each result's relative error against the exact solution (the
closed form in float64). In float32 the explicit inverse is the inaccurate
one: λI + kkᵀ has condition number (λ + kᵀk)/λ, about 10⁶ here.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from editors.closed_form import explicit_inverse_update, solve_update


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats, out


def run(
    d: int = 4096,
    d_ff: int = 11008,
    edits: int = 1,
    lam: float = 0.01,
    device: str = "cpu",
    dtype: str = "float32",
    naive_repeats: int = 1,
    fast_repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Time the closed form against the explicit inverse on random weights; returns a JSON-ready dict."""
    if d < 1 or d_ff < 1 or edits < 1:
        raise ValueError("d, d_ff and edits must be positive")
    if edits > d_ff:
        raise ValueError("more edits than key dimensions: the joint update is not defined")
    dev = torch.device(device)
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(d, d_ff, generator=g) * 0.02).to(dev, dt)
    K = torch.randn(edits, d_ff, generator=g).to(dev, dt)
    Z = torch.randn(edits, d, generator=g).to(dev, dt)

    def ours():
        U = solve_update(K @ W.T, K, Z, lam).to(dt)
        return W + U @ K

    def naive():
        return explicit_inverse_update(W, K, Z, lam)

    t_ours, W_ours = _timed(ours, dev, fast_repeats)
    t_naive, W_naive = _timed(naive, dev, naive_repeats)
    exact = solve_update((K @ W.T).double(), K.double(), Z.double(), lam).double() @ K.double()

    def rel_error(W_new):
        return float(((W_new - W).double() - exact).norm() / exact.norm())

    return {
        "d": d,
        "d_ff": d_ff,
        "edits": edits,
        "device": str(dev),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "naive_seconds": round(t_naive, 4),
        "rank_one_seconds": round(t_ours, 5),
        "speedup": round(t_naive / t_ours, 1),
        "naive_relative_error": rel_error(W_naive),
        "rank_one_relative_error": rel_error(W_ours),
        "naive_peak_extra_bytes": 2 * d_ff * d_ff * W.element_size(),
        "rank_one_extra_bytes": (edits * (d + d_ff) + edits * edits) * W.element_size(),
    }
