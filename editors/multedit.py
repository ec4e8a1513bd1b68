"""MultEdit (Basu et al. 2024, §5 and App. G): a closed-form rank-one edit of
one early MLP's down projection at the last token of the visual constraint.

For a request (image, question, visual constraint, new answer O*):

1. key   k = input of ``down_proj`` at layer ℓ at the constraint's last token;
2. value z* = z + δ, δ found by Adam (paper: lr 0.1) minimising
   −log P(O* | image, question) teacher-forced over all answer tokens;
3. update W′ + (z* − W′k) kᵀ / (λ + kᵀk) (paper: λ = 0.01), stored as the
   factors u = (z* − W′k)/(λ + kᵀk) and v = k; n requests at once solve one
   n×n system: W′ + (Z − W′K)(λIₙ + KᵀK)⁻¹Kᵀ.

``edit`` makes n edits jointly, ``edit_sequentially`` one after another (each
computed on the model with the earlier ones attached) and ``edit_each``
independent single edits from the same model (values optimised in one batch:
the bench's way to run many cases). Every call returns ``EditSet``s in the
edit format of ``edit_set``, each edit with a record of its request, layer,
metrics and the time its key, value and update took.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from vlm.prompts import EncodedPrompt
from vlm.scoring import score_answers

from .attach import attach
from .closed_form import rank_one_updates, solve_update, solve_update_keeping
from .compute_key import constraint_keys
from .configs import MultEditConfig
from .edit_set import FORMAT as EDIT_SET_FORMAT
from .edit_set import EditSet, LowRankDelta
from .key_value import KeyValueEditor
from .registry import EditorSpec, register_editor
from .request import EditProgress, EditRequest, ProgressCallback


def subject_groups(K: torch.Tensor, min_cos: float) -> list[int]:
    """Group numbers 0..G-1: keys with cosine ≥ ``min_cos`` (transitively) are one subject.

    The key at the constraint's last token represents the subject, so two
    facts about one entity share it (cosine ≈ 0.98 on the world model, other
    entities ≈ 0.1); editing both jointly needs one value that gives both answers.
    """
    Kn = K.float() / K.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    close = (Kn @ Kn.T) >= min_cos
    parent = list(range(len(K)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in close.nonzero().tolist():
        parent[root(i)] = root(j)
    roots = [root(i) for i in range(len(K))]
    number = {r: g for g, r in enumerate(dict.fromkeys(roots))}
    return [number[r] for r in roots]


class MultEdit(KeyValueEditor):
    """MultEdit on ``config.layer`` (``layer="auto"``: chosen from the first requests, ``KeyValueEditor``): each
    request's key and value, then the closed-form update of ``closed_form``."""

    name = "multedit"

    # ------------------------------------------------------------------ API
    def edit(
        self, requests: Sequence[EditRequest], onto: EditSet | None = None, progress: ProgressCallback | None = None
    ) -> EditSet:
        """All ``requests`` as one joint update, computed on the model with ``onto`` attached.

        Requests about the same subject (keys with cosine ≥ ``same_subject_cos``)
        share one value, optimised on all their questions at once; the update
        then solves for all keys together. Returns ``onto`` extended by the new
        edits (or a new edit set).
        """
        if not requests:
            raise ValueError("no edit requests")
        self.choose_layer(requests, progress)
        prompts = [self.encode(r) for r in requests]
        with attach(self.vlm, onto) if onto is not None else contextlib.nullcontext():
            delta, records = self._compute(prompts, requests, progress, joint=True, first=0, total=len(requests))
        new = EditSet([delta], self.vlm.fingerprint, self.name, self.hyperparameters("joint"), records)
        return onto.extended(new) if onto is not None else new

    def edit_sequentially(
        self, requests: Sequence[EditRequest], onto: EditSet | None = None, progress: ProgressCallback | None = None
    ) -> EditSet:
        """One edit after another, each computed on the model with all earlier edits attached.

        An earlier edit of this call about the same subject (key cosine ≥
        ``same_subject_cos``) shares the key, so the new value is optimised on
        its question too (with its new answer): a later edit of one subject
        does not overwrite an earlier one. With ``keep_earlier`` the keys of
        the other earlier edits join the closed form as keys whose outputs
        must not change (``closed_form.solve_update_keeping``), so a later edit
        does not leak into them.
        """
        if not requests:
            raise ValueError("no edit requests")
        self.choose_layer(requests, progress)
        current = onto
        history: list[EncodedPrompt] = []
        for i, req in enumerate(requests):
            prompt = self.encode(req)
            with attach(self.vlm, current) if current is not None else contextlib.nullcontext():
                companions, keep = self._same_subject(prompt, history)
                delta, records = self._compute(
                    [prompt],
                    [req],
                    progress,
                    joint=True,
                    first=i,
                    total=len(requests),
                    companions=companions,
                    keep=keep if self.config.keep_earlier else None,
                )
            history.append(prompt)
            new = EditSet([delta], self.vlm.fingerprint, self.name, self.hyperparameters("sequential"), records)
            current = current.extended(new) if current is not None else new
        current.hyperparameters = self.hyperparameters("sequential")
        return current

    def _same_subject(
        self, prompt: EncodedPrompt, history: list[EncodedPrompt]
    ) -> tuple[list[EncodedPrompt], torch.Tensor | None]:
        """Earlier prompts about the same subject, and the keys of the other earlier prompts."""
        if not history:
            return [], None
        K = constraint_keys(self.vlm, [prompt] + history, self.config.layer)
        Kn = K / K.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        same = ((Kn[1:] @ Kn[0]) >= self.config.same_subject_cos).tolist()
        others = K[1:][[not s for s in same]]
        return [p for p, s in zip(history, same) if s], (others.cpu() if len(others) else None)

    def edit_each(
        self, requests: Sequence[EditRequest], batch_size: int = 16, progress: ProgressCallback | None = None
    ) -> list[EditSet]:
        """Independent single edits, each from the current model; values are optimised in batches.

        Timings in the records are the batch's divided by its size. With
        ``layer="auto"`` one layer is chosen from all the requests.
        """
        self.choose_layer(requests, progress)
        out: list[EditSet] = []
        for start in range(0, len(requests), batch_size):
            chunk = list(requests[start : start + batch_size])
            prompts = [self.encode(r) for r in chunk]
            delta, records = self._compute(prompts, chunk, progress, joint=False, first=start, total=len(requests))
            for i, rec in enumerate(records):
                d = LowRankDelta(
                    delta.layer,
                    delta.module,
                    delta.U[:, i : i + 1].clone(),
                    delta.V[:, i : i + 1].clone(),
                    None if delta.K is None else delta.K[:, i : i + 1].clone(),
                )
                out.append(EditSet([d], self.vlm.fingerprint, self.name, self.hyperparameters("single"), [rec]))
        return out

    # ------------------------------------------------------------- the work
    def _compute(
        self,
        prompts: list[EncodedPrompt],
        requests: Sequence[EditRequest],
        progress: ProgressCallback | None,
        joint: bool,
        first: int,
        total: int,
        companions: Sequence[EncodedPrompt] = (),
        keep: torch.Tensor | None = None,
    ) -> tuple[LowRankDelta, list[dict[str, Any]]]:
        """Keys, values and the update for ``prompts``; ``companions`` (earlier edits' prompts
        about the same subjects) join the value optimisation but get no update column;
        ``keep`` (m, d_ff) are keys whose outputs the update must leave as they are."""
        cfg, vlm, n = self.config, self.vlm, len(prompts)
        say = progress or (lambda e: None)
        everything = list(prompts) + list(companions)

        say(EditProgress("key", first, total))
        K_all, t_key = self.keys(everything)  # (n + c, d_ff)
        K = K_all[:n]
        groups = subject_groups(K_all, cfg.same_subject_cos) if joint else None
        values, t_value = self.values(everything, groups, first, total, progress)
        t_key, t_value = t_key * len(everything), t_value * len(everything)  # the call's, shared by its n records

        say(EditProgress("update", first, total))
        t0 = time.perf_counter()
        lin = vlm.module(self.module)
        with torch.no_grad():
            WK = lin(K.to(lin.weight.device, lin.weight.dtype)).float().cpu()  # W′k with earlier edits attached
        K, Z = K.cpu(), values.z_star[:n].cpu()
        U, V = self._update(WK, K, Z, keep, joint)
        delta = self._delta(U.contiguous(), V.contiguous(), K)
        t_update = time.perf_counter() - t0

        p_before = [s.prob for s in score_answers(vlm, prompts)]
        p_after = self._scores_after(prompts, delta, joint)
        say(EditProgress("done", first + n - 1, total))
        records = []
        for i, req in enumerate(requests):
            records.append(
                {
                    "request": req.describe(),
                    "editor": self.name,
                    "layer": cfg.layer,
                    "module": self.module,
                    "metrics": {
                        "p_before": p_before[i],
                        "p_after": p_after[i],
                        "delta_norm": float(values.delta[i].norm()),
                        "value_steps": values.steps[i],
                        "value_prob": values.prob[i],
                        "value_step_size": values.step_sizes[i],
                        "value_group": groups[i] if groups else 0,
                        "value_companions": len(companions),
                        "kept_keys": 0 if keep is None else int(keep.shape[0]),
                    },
                    "seconds": {"key": t_key / n, "value": t_value / n, "update": t_update / n},
                }
            )
        return delta, records

    def _update(
        self, WK: torch.Tensor, K: torch.Tensor, Z: torch.Tensor, keep: torch.Tensor | None, joint: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """U (d, n) and V (d_ff, n) of the update for keys ``K`` (n, d_ff) with targets ``Z`` (n, d), given the
        current outputs ``WK`` (n, d) and the keys ``keep`` (m, d_ff) whose outputs must stay."""
        lam = self.config.lam
        if keep is not None:
            return solve_update_keeping(WK, K, Z, keep, lam)  # (d, n), (d_ff, n)
        if joint:
            return solve_update(WK, K, Z, lam), K.T  # v = k
        return rank_one_updates(WK, K, Z, lam), K.T  # n independent edits: one rank-one column each

    def _delta(self, U: torch.Tensor, V: torch.Tensor, K: torch.Tensor) -> LowRankDelta:
        """The stored delta of an update (MultEdit: V is the keys, so they are not stored twice)."""
        return LowRankDelta(self.config.layer, self.module, U, V)

    def _scores_after(self, prompts: list[EncodedPrompt], delta: LowRankDelta, joint: bool) -> list[float]:
        if joint:
            with attach(self.vlm, [delta]):
                return [s.prob for s in score_answers(self.vlm, prompts)]
        out = []
        for i, p in enumerate(prompts):
            one = LowRankDelta(delta.layer, delta.module, delta.U[:, i : i + 1], delta.V[:, i : i + 1])
            with attach(self.vlm, [one]):
                out.append(score_answers(self.vlm, [p])[0].prob)
        return out


register_editor(
    EditorSpec(
        name="multedit",
        config_class=MultEditConfig,
        edit_set_class=EditSet,
        editor_class=MultEdit,
        format=EDIT_SET_FORMAT,
        description="a rank-one edit of one early MLP at the visual constraint (Basu et al. 2024)",
        layer_rule="mlp_peak",  # layer="auto": the causal trace's MLP peak
        peft_refusal=None,  # low-rank weight deltas: a LoRA adapter each
    )
)
