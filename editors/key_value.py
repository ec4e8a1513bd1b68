"""The base of the key/value editors (MultEdit, AlphaEdit, KeyGate): what they share before they differ.

Each of them edits one MLP's ``down_proj`` at layer ℓ with a key (``compute_key``: the ``down_proj`` input at
the constraint's last token) and a value (``compute_value``: the output there that gives the new answer); they
differ only in where the value goes — a closed-form weight update (MultEdit, ``closed_form``), a projected one
(AlphaEdit) or a key-gated memory (KeyGate). This base holds the shared part once: ``layer="auto"`` chosen from
the first requests by the causal trace (the evidence kept for the manifest), the hyperparameters an edit set
records, and the key and value steps with their timing and progress events.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from diagnostics.recommend import recommend_multedit_layer, request_cases
from vlm.loading import VLM
from vlm.prompts import EncodedPrompt

from .base import DownProjEditor
from .compute_key import constraint_keys
from .compute_value import Values, optimise_values
from .request import EditProgress, EditRequest, ProgressCallback


class KeyValueEditor(DownProjEditor):
    """An editor of ``config.layer``'s ``down_proj`` by a key and a value per request.

    ``config`` has ``layer`` (a layer or "auto") and the value's settings (steps, lr, max_norm, target_prob,
    lr_scale). With ``layer="auto"`` the first call chooses the layer from its requests
    (``diagnostics.recommend``: the peak early-layer MLP indirect effect at the constraint's last token, over
    each request's variants) and keeps it; the evidence goes into the hyperparameters as ``layer_evidence``."""

    def __init__(self, vlm: VLM, config: Any):
        self.layer_evidence: dict | None = None
        if config.layer == "auto":
            config.check(vlm)
            self.vlm, self.config, self.module = vlm, config, None
        else:
            super().__init__(vlm, config)

    def choose_layer(self, requests: Sequence[EditRequest], progress: ProgressCallback | None = None) -> int:
        """Resolve ``layer="auto"`` from the requests (once); returns the layer."""
        if self.config.layer != "auto":
            return self.config.layer
        if not requests:
            raise ValueError("no edit requests")
        cases = [
            c
            for r in requests
            for c in request_cases(
                r.question,
                r.constraint,
                r.image,
                rephrase=r.rephrase,
                image_rephrase=r.image_rephrase,
                pixel_values=r.pixel_values,
                replacements=r.replacements,
            )
        ]

        def say(done: int, total: int) -> None:
            if progress:
                progress(EditProgress("layer", done - 1, total))

        rec = recommend_multedit_layer(self.vlm, cases, progress=say)
        self.config = replace(self.config, layer=rec.layer)
        self.module = self.vlm.arch.module_path("down_proj", rec.layer)
        self.layer_evidence = rec.to_dict()
        return rec.layer

    def hyperparameters(self, mode: str) -> dict:
        out = super().hyperparameters(mode)
        if self.layer_evidence is not None:
            out.update(layer="auto", chosen_layer=self.config.layer, layer_evidence=self.layer_evidence)
        return out

    # ------------------------------------------------------------ the steps
    def keys(self, prompts: Sequence[EncodedPrompt]) -> tuple[torch.Tensor, float]:
        """Step 1: the (n, d_ff) keys of ``prompts`` and the seconds it took per prompt."""
        t0 = time.perf_counter()
        K = constraint_keys(self.vlm, prompts, self.config.layer)
        return K, (time.perf_counter() - t0) / len(prompts)

    def values(
        self,
        prompts: Sequence[EncodedPrompt],
        groups: Sequence[int] | None,
        first: int,
        total: int,
        progress: ProgressCallback | None,
    ) -> tuple[Values, float]:
        """Step 2: the values of ``prompts`` (rows of one group share one), optimised with the config's settings,
        and the seconds it took per prompt; progress events count requests ``first``.. of ``total``."""
        cfg = self.config
        say = progress or (lambda e: None)

        def on_step(step: int, steps: int, loss: float) -> None:
            say(EditProgress("value", first, total, step, steps, loss))

        t0 = time.perf_counter()
        values = optimise_values(
            self.vlm,
            prompts,
            cfg.layer,
            steps=cfg.steps,
            lr=cfg.lr,
            max_norm=cfg.max_norm,
            target_prob=cfg.target_prob,
            lr_scale=cfg.lr_scale,
            groups=groups,
            progress=on_step,
        )
        return values, (time.perf_counter() - t0) / len(prompts)
