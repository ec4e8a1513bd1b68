"""Editing with a trained VEAD: an edit is its signal, one forward pass of the unedited model.

``VisEdit(vlm, adapter).edit(requests, onto=...)`` computes each request's
signal — the hidden states of (image, question ⊕ new answer) at the input of
the adapter's ``signal_layer`` and the row of the question's last token —
and returns a ``VisEditSet`` holding the adapter once and every signal
(``onto``'s first). Each record carries the request, the layers, P(answer)
before and after (the new edit set attached) and the time the signal took.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from editors.base import EditorBase
from editors.configs import VisEditConfig
from editors.files import IncompatibleEditSetError
from editors.registry import EditContext, EditorSpec
from editors.request import EditProgress, EditRequest, ProgressCallback
from vlm.loading import VLM
from vlm.options import ConfigError
from vlm.patching import run_patched
from vlm.prompts import EncodedPrompt, collate, encode
from vlm.scoring import score_answers

from .adapter import VEAD, EditSignal
from .edit_set import VisEditSet
from .scope import QuestionReader, image_keys


def signal_state(layer: int) -> tuple[str, int]:
    """The captured state that is the input of decoder layer ``layer``."""
    return ("embeds", -1) if layer == 0 else ("hidden", layer - 1)


@torch.no_grad()
def compute_signals(
    vlm: VLM,
    prompts: Sequence[EncodedPrompt],
    signal_layer: int,
    summary_layer: int | None = None,
    summary_token: str = "last",
    batch_size: int = 32,
    scope_of: VEAD | None = None,
    rows: str = "all",
) -> list[EditSignal]:
    """Signals of edit prompts encoded with their answers: the rows (every position of the prompt and
    answer) at the input of ``signal_layer``; the mapper's key, the row of the last prompt token (or
    of the constraint's last token, ``summary_token="constraint"``, or the mean of the image rows,
    ``"image"``) at the input of ``summary_layer`` (default: the same layer). With ``scope_of`` (the
    adapter of an edit set with a scope gate), each signal also gets its edit image's scope key, from
    the visual states at the adapter's layer."""
    if summary_token == "constraint" and any(not p.constraint_spans for p in prompts):
        raise ValueError(
            "this VisEdit adapter reads its influence mapper's key at the visual constraint: "
            "every edit needs its constraint (e.g. 'this landmark')"
        )
    summary_layer = signal_layer if summary_layer is None else summary_layer
    keys = [signal_state(signal_layer), signal_state(summary_layer)]
    deepest = max(signal_layer, summary_layer)
    if scope_of is not None:
        if any(not p.image_positions for p in prompts):
            raise ValueError("a VisEdit edit needs an image")
        keys.append(signal_state(scope_of.config.layer))
        deepest = max(deepest, scope_of.config.layer)
    out: list[EditSignal] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        run = run_patched(
            vlm,
            collate(chunk, vlm.tokenizer.pad_token_id),
            capture=set(keys),
            stop_after_layer=max(deepest - 1, 0),
        )
        states = run.captured[keys[0]].float().cpu()
        summary = run.captured[keys[1]].float().cpu()
        scope_keys = None
        if scope_of is not None:
            at_layer = run.captured[keys[2]].float()
            device = scope_of.w1.weight.device  # one key per image (their token counts may differ)
            scope_keys = torch.stack(
                [image_keys(scope_of, at_layer[i, p.image_positions].to(device)) for i, p in enumerate(chunk)]
            ).cpu()
        for i, p in enumerate(chunk):
            if summary_token == "image":
                key = summary[i, p.image_positions].mean(0, keepdim=True)
            else:
                key = summary[i, p.constraint_last if summary_token == "constraint" else p.last_prompt_pos]
            scope_key = None if scope_keys is None else scope_keys[i].clone()
            kept = states[i, : p.length]
            if rows == "text" and p.image_spans:
                text = torch.ones(p.length, dtype=torch.bool)
                text[p.image_positions] = False
                kept = kept[text]
            out.append(EditSignal(kept.clone(), key.clone(), scope_key))
    return out


class VisEdit(EditorBase):
    """The VisEdit editor around one trained adapter (a ``VisEditSet``; its own edits are kept).

    ``source`` says where the trained adapter came from (e.g. the registry version that holds it); it is
    recorded in the hyperparameters of every edit made with it."""

    name = "visedit"
    reads_base_model = True  # the adapter was trained on the base model's states: signals are read there

    def __init__(self, vlm: VLM, adapter: VisEditSet, source: dict[str, Any] | None = None):
        adapter.check_compatible(vlm)
        self.vlm, self.adapter, self.source = vlm, adapter, dict(source or {})
        self._reader: QuestionReader | None = None  # made when the first edit needs question keys
        adapter.vead.to(vlm.input_device)

    @property
    def layer_evidence(self) -> dict[str, Any] | None:
        """How the trained adapter's layer was chosen (its training summary's evidence)."""
        return self.adapter.training.get("layer_evidence")

    def encode(self, request: EditRequest) -> EncodedPrompt:
        return encode(
            self.vlm.processor,
            request.question,
            image=request.image,
            answer=request.answer,
            constraints=[request.constraint] if request.constraint else None,
            pixel_values=request.pixel_values,
        )

    def hyperparameters(self, mode: str) -> dict:
        return {**self.adapter.hyperparameters, **self.source, "mode": mode}

    def _signals(
        self,
        requests: Sequence[EditRequest],
        progress: ProgressCallback | None,
        first: int = 0,
        total: int | None = None,
    ):
        if not requests:
            raise ValueError("no edit requests")
        total = total or len(requests)
        if progress:
            progress(EditProgress("signal", first, total))
        prompts = [self.encode(r) for r in requests]
        t0 = time.perf_counter()
        cfg = self.adapter.config
        scope = self.adapter.scope
        signals = compute_signals(
            self.vlm,
            prompts,
            cfg.signal_layer,
            cfg.last_layer,
            cfg.summary_token,
            scope_of=self.adapter.vead if scope is not None else None,
            rows=cfg.signal_rows,
        )
        if scope is not None and scope.asks:
            if self._reader is None:
                self._reader = QuestionReader(self.vlm)
            for p, sig in zip(prompts, signals):
                sig.question = self._reader.keys(p.input_ids.unsqueeze(0), [p.image_span[1]])[0]
        t_signal = (time.perf_counter() - t0) / len(requests)
        p_before = [s.prob for s in score_answers(self.vlm, prompts)]
        return prompts, signals, t_signal, p_before

    def _record(self, request: EditRequest, p_before: float, p_after: float, t_signal: float) -> dict:
        cfg = self.adapter.config
        return {
            "request": request.describe(),
            "editor": self.name,
            "layer": cfg.layer,
            "signal_layer": cfg.signal_layer,
            "metrics": {"p_before": p_before, "p_after": p_after},
            "seconds": {"signal": t_signal},
        }

    def edit(
        self, requests: Sequence[EditRequest], onto: VisEditSet | None = None, progress: ProgressCallback | None = None
    ) -> VisEditSet:
        """Every request becomes one signal; returns ``onto`` (or the adapter alone) with them added.
        P(answer) after is measured with all of the returned set's edits live."""
        base = onto if onto is not None else self.adapter.without_edits()
        if onto is not None and not onto.same_adapter(self.adapter):
            made_with = " than this one (" + ", ".join(f"{k} {v}" for k, v in self.source.items()) + ")"
            made_with = made_with if self.source else ""
            raise IncompatibleEditSetError(
                f"the VisEdit edits to extend were made with another trained VisEdit adapter{made_with}; "
                "edit them with that adapter, or start another adapter lineage"
            )
        prompts, signals, t_signal, p_before = self._signals(requests, progress)
        new = base.with_edits(signals, [{} for _ in requests])
        with new.attach(self.vlm):
            p_after = [s.prob for s in score_answers(self.vlm, prompts)]
        if progress:
            progress(EditProgress("done", len(requests) - 1, len(requests)))
        return base.with_edits(
            signals, [self._record(r, pb, pa, t_signal) for r, pb, pa in zip(requests, p_before, p_after)]
        )

    def edit_each(
        self, requests: Sequence[EditRequest], batch_size: int = 32, progress: ProgressCallback | None = None
    ) -> list[VisEditSet]:
        """Independent single edits (one signal each, from the adapter alone); signals computed in batches."""
        out: list[VisEditSet] = []
        empty = self.adapter.without_edits()
        for start in range(0, len(requests), batch_size):
            chunk = list(requests[start : start + batch_size])
            prompts, signals, t_signal, p_before = self._signals(chunk, progress, start, len(requests))
            for r, p, sig, pb in zip(chunk, prompts, signals, p_before):
                one = empty.with_edits([sig], [{}])
                with one.attach(self.vlm):
                    pa = score_answers(self.vlm, [p])[0].prob
                out.append(empty.with_edits([sig], [self._record(r, pb, pa, t_signal)]))
        return out

    def edit_sequentially(
        self, requests: Sequence[EditRequest], onto: VisEditSet | None = None, progress: ProgressCallback | None = None
    ) -> VisEditSet:
        """Edits one after another: every signal is read from the unedited model, so this is ``edit``."""
        return self.edit(requests, onto=onto, progress=progress)


def world_adapter(world_dir: Path) -> dict[str, Any]:
    """The adapter `editlens visedit train` wrote for this world, when there is one."""
    from vlm.world.folder import WorldFolder

    path = WorldFolder(world_dir).visedit_adapter
    return {"adapter": str(path)} if path.is_file() else {}


def create_visedit(spec: EditorSpec, vlm: VLM, config: VisEditConfig, context: EditContext) -> VisEdit:
    """The editor around its trained adapter: a file (``adapter``) or a registry version (``editor_adapter``)."""
    if config.adapter:
        return VisEdit(vlm, VisEditSet.load(config.adapter, vlm), {"adapter_file": config.adapter})
    if context.lookup is None:
        raise ConfigError(
            f"editor_adapter {config.editor_adapter!r} names a registry version, which only a server can read; "
            "locally, give the adapter file"
        )
    trained, version = context.lookup(spec.name, config.editor_adapter, config.editor_version)
    return VisEdit(vlm, trained, {"editor_adapter": config.editor_adapter, "editor_version": version})
