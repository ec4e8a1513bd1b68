"""AlphaEdit (Fang et al., ICLR 2025) on MultEdit's key and value: null-space-projected sequential updates.

MultEdit's update W′ + (z* − W′k)kᵀ/(λ + kᵀk) knows nothing of the keys the
model already uses, so each edit moves them too. AlphaEdit restricts the update
to the null space of the preservation statistic C₀ = E[kkᵀ] (``editors.
preservation``): with B (d_ff × r) the eigenvectors of C₀ whose eigenvalue is
below ``null_threshold`` (AlphaEdit: 2e-2), the update is Δ = D Bᵀ, so Δk ≈ 0
for every key the statistics saw. Earlier edits' keys K_p are kept too:

    D = argmin ‖D B̃ᵀK₁ᵀ − R‖² + ‖D BᵀK_pᵀ‖² + λ‖D‖²,   R = Z* − W′K₁,

AlphaEdit's objective (their λ = 1, ``lam``), solved without a d_ff × d_ff
inverse: with K̃ = [K₁; K_p]B, D = Rᵀ((λI + K̃K̃ᵀ)⁻¹K̃)[:n] — an (n + m)² system
(``closed_form.solve_update_keeping`` on projected keys). This is recursive least
squares: editing n facts one after another gives exactly the joint solution of
the same targets (a test checks it to 1e-4). Each edit is stored as a rank-one
pair (u, v = B·ṽ) plus its key k, so the next edit — in another process, on
another replica — can keep it; the edit set stays a plain low-rank delta that
PEFT can load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from .attach import attach
from .closed_form import solve_update_keeping
from .configs import AlphaEditConfig
from .edit_set import FORMAT as EDIT_SET_FORMAT
from .edit_set import EditSet, EditSetError, LowRankDelta
from .multedit import MultEdit
from .preservation import preservation_statistics
from .registry import EditorSpec, register_editor
from .request import EditRequest, ProgressCallback


def projected_update(
    WK: torch.Tensor, K: torch.Tensor, Z: torch.Tensor, keep: torch.Tensor | None, B: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """U (d, n) and V (d_ff, n) of AlphaEdit's update for keys ``K`` (n, d_ff) with targets ``Z`` (n, d), the
    current outputs ``WK`` (n, d), the kept keys ``keep`` (m, d_ff) and the null-space basis ``B`` (d_ff, r)."""
    B = B.to(K.dtype)
    kept = torch.zeros(0, B.shape[1]) if keep is None else keep.to(K.dtype) @ B
    U, Vr = solve_update_keeping(WK, K @ B, Z, kept, lam)
    return U, (B.double() @ Vr.double()).float()


class AlphaEdit(MultEdit):
    """MultEdit's key and value with AlphaEdit's projected update that keeps every earlier edit's key."""

    name = "alphaedit"

    def __init__(self, vlm, config: AlphaEditConfig):
        super().__init__(vlm, config)
        self._basis: tuple[str, torch.Tensor] | None = None

    def basis(self) -> torch.Tensor:
        """(d_ff, r) null space of C₀ at the edited layer (computed once per layer and statistics)."""
        stats = preservation_statistics(self.vlm, self.config.layer)
        tag = f"{stats.digest}/{self.config.layer}/{self.config.null_threshold}"
        if self._basis is None or self._basis[0] != tag:
            B = stats.null_space(self.config.null_threshold).float()
            if B.shape[1] == 0:
                raise EditSetError(
                    f"C₀ of layer {self.config.layer} has no eigenvalue below {self.config.null_threshold}: the null "
                    "space is empty; raise null_threshold"
                )
            self._basis = (tag, B)
            self.statistics_digest = stats.digest
        return self._basis[1]

    def hyperparameters(self, mode: str) -> dict:
        out = super().hyperparameters(mode)
        if self._basis is not None:
            out["null_space_dim"] = int(self._basis[1].shape[1])
            out["statistics"] = self.statistics_digest
        return out

    def _update(self, WK, K, Z, keep, joint):
        B = self.basis()
        if joint or keep is not None:
            return projected_update(WK, K, Z, keep, B, self.config.lam)
        cols = [
            projected_update(WK[i : i + 1], K[i : i + 1], Z[i : i + 1], None, B, self.config.lam) for i in range(len(K))
        ]
        return torch.cat([u for u, _ in cols], 1), torch.cat([v for _, v in cols], 1)

    def _delta(self, U, V, K):
        return LowRankDelta(self.config.layer, self.module, U, V, K.T.contiguous())

    def earlier_keys(self, onto: EditSet | None) -> torch.Tensor | None:
        """(m, d_ff) keys of the earlier edits at this editor's layer (None with ``keep_earlier`` off: the
        projection alone, AlphaEdit without its cache of earlier keys)."""
        if onto is None or not self.config.keep_earlier:
            return None
        keys = []
        for d in onto.deltas:
            if d.layer != self.config.layer:
                continue
            if d.K is None:
                raise EditSetError("an AlphaEdit edit builds on edit sets that store their keys (AlphaEdit's)")
            keys.append(d.K.T)
        return torch.cat(keys).cpu() if keys else None

    def edit(
        self, requests: Sequence[EditRequest], onto: EditSet | None = None, progress: ProgressCallback | None = None
    ) -> EditSet:
        """All ``requests`` as one update on the model with ``onto`` attached, keeping its edits' keys."""
        if not requests:
            raise ValueError("no edit requests")
        self.choose_layer(requests, progress)
        prompts = [self.encode(r) for r in requests]
        keep = self.earlier_keys(onto)
        with attach(self.vlm, onto) if onto is not None else contextlib.nullcontext():
            delta, records = self._compute(prompts, requests, progress, True, 0, len(requests), keep=keep)
        new = EditSet([delta], self.vlm.fingerprint, self.name, self.hyperparameters("joint"), records)
        return onto.extended(new) if onto is not None else new

    def edit_sequentially(
        self, requests: Sequence[EditRequest], onto: EditSet | None = None, progress: ProgressCallback | None = None
    ) -> EditSet:
        """One request after another, each keeping the keys of every earlier edit (``onto``'s included)."""
        if not requests:
            raise ValueError("no edit requests")
        self.choose_layer(requests, progress)
        current = onto
        for i, req in enumerate(requests):
            prompt = self.encode(req)
            keep = self.earlier_keys(current)
            with attach(self.vlm, current) if current is not None else contextlib.nullcontext():
                delta, records = self._compute([prompt], [req], progress, True, i, len(requests), keep=keep)
            new = EditSet([delta], self.vlm.fingerprint, self.name, self.hyperparameters("sequential"), records)
            current = current.extended(new) if current is not None else new
        current.hyperparameters = self.hyperparameters("sequential")
        return current


register_editor(
    EditorSpec(
        name="alphaedit",
        config_class=AlphaEditConfig,
        edit_set_class=EditSet,
        editor_class=AlphaEdit,
        format=EDIT_SET_FORMAT,
        description="MultEdit's key and value with AlphaEdit's null-space projected update (Fang et al. 2025)",
        layer_rule="mlp_peak",  # layer="auto": the causal trace's MLP peak
        peft_refusal=None,  # low-rank weight deltas: a LoRA adapter each
    )
)
