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
training them one at a time. Sequential edits fine-tune one ΔW per module
request after request.

The edit set (``FineTuneEditSet``, format ``editlens.dense_edit_set``) holds
one dense ΔW per edited module (``delta.<i>.W``) and a record per edit; it
attaches and detaches like MultEdit's (a forward hook adds x ΔWᵀ), so FT-L is
served and benchmarked like any other registered editor. It costs d × d_ff
floats per module (256 KB on the world model, 180 MB at 7B scale), which is
what the baseline is: a dense update.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlm.hooks import Rows
from vlm.loading import VLM
from vlm.patching import run_patched
from vlm.prompts import EncodedPrompt, collate
from vlm.scoring import score_answers

from .attach import AttachedDeltas, attach
from .base import DownProjEditor, EditSetBase
from .compute_value import answer_nll
from .configs import FineTuneConfig
from .edit_set import check_linear_shapes
from .files import (
    EditSetError,
    FingerprintMismatchError,
    IncompatibleEditSetError,
    check_fingerprint,
    check_no_extra,
    check_tensor,
)
from .registry import EditorSpec, register_editor
from .request import EditProgress, EditRequest, ProgressCallback

FORMAT = "editlens.dense_edit_set"
FORMAT_VERSION = 1


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
class FineTuneEditSet(EditSetBase):
    """Dense deltas ΔW (one per edited module) and a record per edit."""

    FORMAT: ClassVar[str] = FORMAT
    FORMAT_VERSION: ClassVar[int] = FORMAT_VERSION
    KIND: ClassVar[str] = "an FT-L edit set"
    REQUIRED: ClassVar[tuple[str, ...]] = ("deltas",)

    deltas: list[DenseDelta]
    base_fingerprint: str
    editor: str = "ft"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def _delta_entries(self) -> list[dict[str, Any]]:
        return [{"layer": d.layer, "module": d.module, "shape": list(d.W.shape)} for d in self.deltas]

    def attach(self, vlm: VLM, rows: Rows | None = None) -> AttachedDeltas:
        return AttachedDeltas(vlm, self.deltas, rows)

    def describe(self, size_bytes: int | None = None) -> dict[str, Any]:
        return {
            **super().describe(size_bytes),
            "deltas": self._delta_entries(),
            "hyperparameters": self.hyperparameters,
        }

    def manifest_body(self) -> dict[str, Any]:
        return {"hyperparameters": self.hyperparameters, "deltas": self._delta_entries()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"delta.{i}.W": d.W.detach().float().contiguous().cpu() for i, d in enumerate(self.deltas)}

    @classmethod
    def from_manifest(cls, man: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> FineTuneEditSet:
        deltas = []
        for i, info in enumerate(man["deltas"]):
            name = f"delta.{i}.W"
            if name not in tensors:
                raise EditSetError(f"{source}: tensor {name} is missing")
            W = check_tensor(tensors[name], name, source, dim=2)
            if list(W.shape) != info.get("shape"):
                raise EditSetError(f"{source}: {name} has shape {list(W.shape)}, the manifest says {info.get('shape')}")
            deltas.append(DenseDelta(int(info["layer"]), str(info["module"]), W))
        check_no_extra(tensors, {f"delta.{i}.W" for i in range(len(deltas))}, source)
        return cls(
            deltas,
            str(man["base_fingerprint"]),
            str(man.get("editor", "ft")),
            dict(man.get("hyperparameters") or {}),
            list(man["records"]),
        )

    def check_compatible(self, vlm: VLM) -> None:
        check_fingerprint(self.base_fingerprint, vlm, "this FT-L edit set")
        check_linear_shapes(vlm, [(d.module, tuple(d.W.shape)) for d in self.deltas])

    def extended(self, deltas: list[DenseDelta], records: list[dict[str, Any]]) -> FineTuneEditSet:
        """This edit set with ``deltas`` replacing those of the same modules, and ``records`` added."""
        modules = {d.module for d in deltas}
        return FineTuneEditSet(
            [d for d in self.deltas if d.module not in modules] + list(deltas),
            self.base_fingerprint,
            self.editor,
            dict(self.hyperparameters),
            self.records + list(records),
        )


class FineTune(DownProjEditor):
    """FT-L on ``config.layer``'s down projection."""

    name = "ft"

    def __init__(self, vlm: VLM, config: FineTuneConfig):
        super().__init__(vlm, config)
        self.shape = tuple(vlm.module(self.module).weight.shape)

    def _empty(self, mode: str) -> FineTuneEditSet:
        return FineTuneEditSet([], self.vlm.fingerprint, self.name, self.hyperparameters(mode))

    def _record(self, request: EditRequest, p_before: float, p_after: float, seconds: float) -> dict[str, Any]:
        return {
            "request": request.describe(),
            "editor": self.name,
            "layer": self.config.layer,
            "module": self.module,
            "metrics": {"p_before": p_before, "p_after": p_after},
            "seconds": {"train": seconds},
        }

    def _probs(self, prompts: list[EncodedPrompt], deltas: Sequence[DenseDelta] = ()) -> list[float]:
        with attach(self.vlm, list(deltas)):
            return [s.prob for s in score_answers(self.vlm, prompts)]

    def edit_each(
        self, requests: Sequence[EditRequest], batch_size: int = 16, progress: ProgressCallback | None = None
    ) -> list[FineTuneEditSet]:
        """Independent fine-tunes, each from the current model; one edit set per request."""
        out: list[FineTuneEditSet] = []
        for start in range(0, len(requests), batch_size):
            chunk = list(requests[start : start + batch_size])
            prompts = [self.encode(r) for r in chunk]
            before = self._probs(prompts)
            W0 = torch.zeros(len(chunk), *self.shape)
            W, info = self._train(prompts, W0, progress, start, len(requests))
            for i, (req, p) in enumerate(zip(chunk, prompts)):
                d = DenseDelta(self.config.layer, self.module, W[i])
                after = self._probs([p], [d])[0]
                rec = self._record(req, before[i], after, info["seconds"] / len(chunk))
                out.append(self._empty("single").extended([d], [rec]))
        return out

    def edit_sequentially(
        self,
        requests: Sequence[EditRequest],
        onto: FineTuneEditSet | None = None,
        progress: ProgressCallback | None = None,
    ) -> FineTuneEditSet:
        """One ΔW, fine-tuned on each request in turn, starting from ``onto`` (earlier FT-L edits)."""
        current = onto if onto is not None else self._empty("sequential")
        if current.base_fingerprint != self.vlm.fingerprint:
            raise FingerprintMismatchError("the FT-L edit set to extend was made for another base model")
        if current.editor != self.name:
            raise IncompatibleEditSetError(f"cannot extend a {current.editor} edit set with FT-L")
        W = sum((d.W for d in current.deltas if d.module == self.module), torch.zeros(*self.shape))
        others = [d for d in current.deltas if d.module != self.module]
        for i, req in enumerate(requests):
            prompt = self.encode(req)
            before = self._probs([prompt], current.deltas)[0]
            with attach(self.vlm, others):
                W_new, info = self._train([prompt], W[None], progress, i, len(requests))
            W = W_new[0]
            d = DenseDelta(self.config.layer, self.module, W)
            after = self._probs([prompt], [*others, d])[0]
            current = current.extended([d], [self._record(req, before, after, info["seconds"])])
        return current

    def edit(
        self,
        requests: Sequence[EditRequest],
        onto: FineTuneEditSet | None = None,
        progress: ProgressCallback | None = None,
    ) -> FineTuneEditSet:
        """FT-L has no joint closed form: the requests are fine-tuned one after another."""
        return self.edit_sequentially(requests, onto, progress)

    def _train(
        self, prompts: list[EncodedPrompt], W0: torch.Tensor, progress: ProgressCallback | None, first: int, total: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
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


register_editor(
    EditorSpec(
        name="ft",
        config_class=FineTuneConfig,
        edit_set_class=FineTuneEditSet,
        editor_class=FineTune,
        format=FORMAT,
        description="FT-L: a dense fine-tune of the same down projection (the baseline)",
        peft_refusal="an FT-L edit set is a dense weight change, not a low-rank one",
    )
)
