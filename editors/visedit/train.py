"""Training the VEAD with the base model frozen (Chen et al. §4.3).

Every step draws ``batch_size`` edit samples of the training split (the
order is a function of the seed and the step, so a resumed run continues
exactly where it stopped) and runs, in one batched forward pass with each
row edited by its own sample's signal:

* reliability and text / modal generality rows → NLL of the new answer
  (ℓ_rel, ℓ_gen: eq. 18–19, teacher-forced over all answer tokens);
* the unrelated image question → KL(base ‖ edited) at its answer tokens
  (ℓ_loc, eq. 20). The text-only half of ℓ_loc is identically zero for an
  adapter that changes only visual positions; it is evaluated on the
  validation samples as a check (``text_locality_kl``) instead of every step;
* the influence mapper on ``im_tokens`` sampled visual tokens: up on the
  reliability and modal-generality rows (ℓ_im↑, eq. 21), down on the
  unrelated one (ℓ_im↓, eq. 22), and a cross-entropy towards the
  visual-representation attribution (ℓ_ima, eq. 23–24): the attribution of
  each sampled visual token of the reliability / generality image to the
  edit prompt's last token at the high-contribution layers L_h, normalised
  over the sampled tokens, against the softmax of the mapper's logits there.
  The attribution needs only the base model, so it is computed once per
  (prompt, image) and cached. Where the last token does not attend to the
  image at L_h (summed attribution < ``ATTRIBUTION_FLOOR``) the term has no
  target and is left out; the summary counts how often.

The total is ℓ_rel + ℓ_gen + ℓ_loc + ℓ_im↑ + ℓ_im↓ + ℓ_ima, each with a
weight (default 1, the paper's). Every ``eval_every`` steps the validation
samples (entities the training samples never show) are scored; the adapter
with the lowest validation loss is written as ``adapter.safetensors`` (a
``VisEditSet`` with no edits). ``checkpoint.safetensors`` (adapter, Adam
state, step, loss curve; no pickle) is written every ``checkpoint_every``
steps and a run started on the same folder resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from editors.configs import LOSSES, TrainError, VisEditTrainConfig
from vlm.images import ProcessedImage, process_image
from vlm.loading import VLM
from vlm.patching import Patch, run_patched
from vlm.prompts import EncodedPrompt, collate, encode

from .adapter import VEAD, AttachedVEAD, EditSignal, SignalBatch, VEADConfig
from .data import Split, training_samples
from .edit_set import VisEditSet
from .editor import compute_signals, signal_state

ATTRIBUTION_FLOOR = 1e-4  # summed attribution over the sampled tokens below which ℓ_ima is left out


def stable_seed(key: Any) -> int:
    """A seed from ``repr(key)`` that is the same in every process (Python's hash() of a str is not)."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:4], "little")


@dataclass
class TrainProgress:
    """``stage``: prepare | layers | train | validate | checkpoint | calibrate | done."""

    stage: str
    step: int = 0
    steps: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    validation_loss: float | None = None
    best_step: int | None = None
    message: str = ""


ProgressFn = Callable[[TrainProgress], None]


@dataclass
class Rows:
    """The encoded prompts of one sample: reliability, text and modal generality, modal locality,
    text locality, and the edit prompt (with the answer) that the signal is read from."""

    rel: EncodedPrompt
    tgen: EncodedPrompt
    mgen: EncodedPrompt
    mloc: EncodedPrompt
    tloc: EncodedPrompt


class Trainer:
    def __init__(
        self,
        vlm: VLM,
        world_dir: str | Path,
        out_dir: str | Path,
        config: VisEditTrainConfig,
        progress: ProgressFn | None = None,
    ):
        config.check()
        self.vlm, self.world_dir, self.out = vlm, Path(world_dir), Path(out_dir)
        self.config = config
        self.say = progress or (lambda p: None)
        self.split: Split | None = None
        self._pixels: dict[str, ProcessedImage] = {}
        self._rows: dict[str, Rows] = {}
        self._signals: dict[str, EditSignal] = {}
        self._base_loc: dict[str, torch.Tensor] = {}
        self._attr: dict[tuple[str, str], torch.Tensor] = {}
        self.layer_evidence: dict[str, Any] | None = None
        self.attr_skipped = 0

    # ------------------------------------------------------------ data
    def _pix(self, rel: str) -> ProcessedImage:
        from vlm.images import load_image

        if rel not in self._pixels:
            img = self.split.images[rel] if rel in self.split.images else load_image(self.world_dir / rel)
            self._pixels[rel] = process_image(self.vlm.processor, img)
        return self._pixels[rel]

    @staticmethod
    def _key(s: dict[str, Any]) -> str:
        return json.dumps(
            [
                s.get(f)
                for f in (
                    "src",
                    "rephrase",
                    "alt",
                    "image",
                    "image_rephrase",
                    "m_loc",
                    "m_loc_q",
                    "m_loc_a",
                    "loc",
                    "loc_ans",
                )
            ]
        )

    def rows(self, s: dict[str, Any]) -> Rows:
        k = self._key(s)
        if k not in self._rows:
            P = self.vlm.processor
            self._rows[k] = Rows(
                rel=encode(
                    P, s["src"], answer=s["alt"], constraints=[s["constraint"]], pixel_values=self._pix(s["image"])
                ),
                tgen=encode(P, s["rephrase"], answer=s["alt"], pixel_values=self._pix(s["image"])),
                mgen=encode(P, s["src"], answer=s["alt"], pixel_values=self._pix(s["image_rephrase"])),
                mloc=encode(P, s["m_loc_q"], answer=s["m_loc_a"], pixel_values=self._pix(s["m_loc"])),
                tloc=encode(P, s["loc"], answer=s["loc_ans"]),
            )
        return self._rows[k]

    def signals(self, samples: Sequence[dict[str, Any]]) -> list[EditSignal]:
        todo = [s for s in samples if self._key(s) not in self._signals]
        if todo:
            vc = self.vead_config
            sig = compute_signals(
                self.vlm,
                [self.rows(s).rel for s in todo],
                vc.signal_layer,
                vc.last_layer,
                vc.summary_token,
                rows=vc.signal_rows,
            )
            for s, x in zip(todo, sig):
                self._signals[self._key(s)] = x
        return [self._signals[self._key(s)] for s in samples]

    @torch.no_grad()
    def base_locality(self, samples: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
        """log-probabilities of the unedited model at the unrelated question's answer positions."""
        todo = [s for s in samples if self._key(s) not in self._base_loc]
        if todo:
            prompts = [self.rows(s).mloc for s in todo]
            run = run_patched(self.vlm, collate(prompts, self.vlm.tokenizer.pad_token_id))
            for i, (s, p) in enumerate(zip(todo, prompts)):
                pos = [a - 1 for a in p.answer_positions]
                self._base_loc[self._key(s)] = torch.log_softmax(run.logits_at([i] * len(pos), pos), -1)
        return [self._base_loc[self._key(s)] for s in samples]

    @torch.no_grad()
    def attribution(self, question_prompt: EncodedPrompt, image: str) -> torch.Tensor:
        """(N_v,) visual-representation attribution (VisEdit eq. 7) of each visual token of ``image`` to
        the edit prompt's last token, averaged over the layers L_h: noise N(0, (3σ)²) on one visual state
        at the input of layer l, (1 − cos)/2 of the attention output at the last prompt position."""
        key = (question_prompt.question, image)
        if key in self._attr:
            return self._attr[key]
        vlm = self.vlm
        p = encode(vlm.processor, question_prompt.question, pixel_values=self._pix(image))
        img, last = p.image_positions, p.last_prompt_pos
        layers = self.attribution_layers
        inputs = collate([p], vlm.tokenizer.pad_token_id)
        caps = [("embeds", -1)] + [("hidden", l - 1) for l in layers if l > 0] + [("attn", l) for l in layers]
        clean = run_patched(vlm, inputs, capture=caps).captured
        g = torch.Generator().manual_seed(stable_seed(key))
        rows, index = [], []
        for l in layers:
            states = clean[signal_state(l)][0, img].float()
            std = float(states.std()) * 3.0
            kind, at = ("embeds", []) if l == 0 else ("hidden", [l - 1])
            for n, pos in enumerate(img):
                eps = torch.randn(1, states.shape[1], generator=g) * std
                rows.append(Patch(len(rows), kind, [pos], eps.to(states.dtype), at, mode="add"))
                index.append((l, n))
        batch = collate([p] * len(rows), vlm.tokenizer.pad_token_id)
        run = run_patched(vlm, batch, patches=rows, capture=[("attn", l) for l in layers], stop_after_layer=max(layers))
        out = torch.zeros(len(img))
        for r, (l, n) in enumerate(index):
            a = clean[("attn", l)][0, last].float()
            a_t = run.captured[("attn", l)][r, last].float()
            out[n] += float((1 - F.cosine_similarity(a_t, a, dim=0)) / 2) / len(layers)
        self._attr[key] = out
        return out

    # ------------------------------------------------------------ layers
    def choose_layers(self) -> VEADConfig:
        from diagnostics.cases import DiagnosticCase
        from diagnostics.recommend import recommend_vead_layer

        cfg = self.config
        auto = cfg.layer == "auto" or cfg.attribution_layers == "auto"
        rec = None
        if auto:
            self.say(TrainProgress("layers", message="choosing the VEAD layer (module attribution, image read-out)"))
            cases = [
                DiagnosticCase(
                    s["src"],
                    s["constraint"],
                    pixel_values=self._pix(s["image"]),
                    image=self.world_dir / s["image"],
                    label=s.get("case_id", ""),
                )
                for s in self.split.train[:: max(1, len(self.split.train) // cfg.recommend_cases)][
                    : cfg.recommend_cases
                ]
            ]
            rec = recommend_vead_layer(self.vlm, cases)
            self.layer_evidence = rec.to_dict()
        layer = rec.layer if cfg.layer == "auto" else int(cfg.layer)
        signal_layer = layer if cfg.signal_layer == "auto" else int(cfg.signal_layer)
        if cfg.attribution_layers == "auto":
            start, end = rec.details["block"]
            self.attribution_layers = list(range(start, end + 1))
        else:
            self.attribution_layers = [int(l) for l in cfg.attribution_layers]
        summary = None if cfg.summary_layer == "auto" else cfg.summary_layer
        vc = VEADConfig(
            hidden_size=self.vlm.hidden_size,
            layer=layer,
            signal_layer=signal_layer,
            width=cfg.width,
            heads=cfg.heads,
            summary_layer=None if summary is None else int(summary),
            summary_token=cfg.summary_token,
            mapper_context=cfg.mapper_context,
            mapper_tied=cfg.mapper_tied,
            signal_rows=cfg.signal_rows,
        )
        try:
            vc.check(self.vlm.num_layers, self.vlm.hidden_size)
            bad = [l for l in self.attribution_layers if not 0 <= l < self.vlm.num_layers]
            if bad or not self.attribution_layers:
                raise ValueError(
                    f"attribution layers {bad or self.attribution_layers} outside 0..{self.vlm.num_layers - 1}"
                )
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        return vc

    # ------------------------------------------------------------ the loss
    def losses(
        self, vead: VEAD, samples: Sequence[dict[str, Any]], rng: random.Random, grad: bool
    ) -> dict[str, torch.Tensor]:
        vlm, cfg = self.vlm, self.config
        rows = [self.rows(s) for s in samples]
        prompts = [p for r in rows for p in (r.rel, r.tgen, r.mgen, r.mloc)]
        sigs = [x for x in self.signals(samples) for _ in range(4)]
        base_loc = self.base_locality(samples)
        inputs = collate(prompts, vlm.tokenizer.pad_token_id)
        with (
            torch.set_grad_enabled(grad),
            AttachedVEAD(vlm, vead, SignalBatch(sigs, device=vlm.input_device), mode="paired") as att,
        ):
            run = run_patched(vlm, inputs, grad=grad)
            logits = att.logits  # (4B, N_v)
        n = len(samples)
        out = {k: torch.zeros(()) for k in LOSSES}
        for i, p in enumerate(prompts):
            pos = [a - 1 for a in p.answer_positions]
            lp = torch.log_softmax(run.logits_at([i] * len(pos), pos), -1)
            kind = i % 4
            if kind < 3:
                nll = -lp[torch.arange(len(pos)), torch.tensor(p.answer_ids, device=lp.device)].sum()
                out["rel" if kind == 0 else "gen"] = out["rel" if kind == 0 else "gen"] + nll / n
            else:
                base = base_loc[i // 4].to(lp.device)
                out["loc"] = out["loc"] + (base.exp() * (base - lp)).sum() / n
        n_v = logits.shape[1]
        k = min(cfg.im_tokens, n_v)
        lg = logits.view(n, 4, n_v)
        for b, s in enumerate(samples):
            idx = torch.tensor(sorted(rng.sample(range(n_v), k)), device=lg.device)
            up = torch.cat([lg[b, 0, idx], lg[b, 2, idx]])
            out["im_up"] = out["im_up"] - F.logsigmoid(up).mean() / n
            out["im_down"] = out["im_down"] - F.logsigmoid(-lg[b, 3, idx]).mean() / n
            if cfg.weights.get("im_attr", 1.0) > 0:
                which = rng.choice((0, 2))  # h̊: rel or modal-generality
                image = s["image"] if which == 0 else s["image_rephrase"]
                c = self.attribution(rows[b].rel, image).to(lg.device)[idx].clamp(min=0.0)
                if float(c.sum()) < ATTRIBUTION_FLOOR:  # the last token does not look at the image here:
                    self.attr_skipped += 1  # the attribution has no target to give
                    continue
                target = c / c.sum()
                out["im_attr"] = out["im_attr"] - (target * torch.log_softmax(lg[b, which, idx], -1)).sum() / n
        return out

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.config.weights.get(k, 1.0) * v for k, v in parts.items())

    @torch.no_grad()
    def validate(self, vead: VEAD) -> dict[str, float]:
        vead.eval()
        rng = random.Random(f"visedit-validation-{self.config.seed}")
        samples = self.validation
        parts = dict.fromkeys(LOSSES, 0.0)
        bs = self.config.batch_size
        for start in range(0, len(samples), bs):
            chunk = samples[start : start + bs]
            got = self.losses(vead, chunk, rng, grad=False)
            for k, v in got.items():
                parts[k] += float(v) * len(chunk) / len(samples)
        vead.train()
        parts["total"] = sum(self.config.weights.get(k, 1.0) * parts[k] for k in LOSSES)
        return parts

    # ------------------------------------------------------------ files
    def _checkpoint_path(self) -> Path:
        return self.out / "checkpoint.safetensors"

    def save_checkpoint(self, vead: VEAD, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        tensors = {f"vead.{k}": v.detach().float().contiguous().cpu() for k, v in vead.state_dict().items()}
        names = dict(vead.named_parameters())
        by_id = {id(p): n for n, p in names.items()}
        for p, st in opt.state.items():
            n = by_id[id(p)]
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"adam.{n}.{key}"] = st[key].detach().float().contiguous().cpu()
            tensors[f"adam.{n}.step"] = torch.as_tensor(float(st["step"])).reshape(1)
        tmp = self._checkpoint_path().with_name("checkpoint.safetensors.tmp")
        save_file(tensors, str(tmp), metadata={"editlens_visedit_checkpoint": json.dumps(state)})
        os.replace(tmp, self._checkpoint_path())

    def load_checkpoint(self, vead: VEAD, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        from safetensors import safe_open

        path = self._checkpoint_path()
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                state = json.loads((f.metadata() or {})["editlens_visedit_checkpoint"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise TrainError(f"{path} is not a readable checkpoint ({exc}); delete it to start afresh") from None
        if state.get("config_key") != json.loads(json.dumps(self.config.resolved_key())):
            raise TrainError(
                f"{path} was written by a run with other settings; use another --out folder "
                "or delete the checkpoint to start afresh"
            )
        vead.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("vead.")})
        names = dict(vead.named_parameters())
        for n, p in names.items():
            if f"adam.{n}.exp_avg" in tensors:
                opt.state[p] = {
                    "step": torch.tensor(float(tensors[f"adam.{n}.step"][0])),
                    "exp_avg": tensors[f"adam.{n}.exp_avg"].clone(),
                    "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"].clone(),
                }
        return state

    def save_adapter(self, vead: VEAD, summary: dict[str, Any]) -> Path:
        copy = VEAD(vead.config)
        copy.load_state_dict(vead.state_dict())
        path = self.out / "adapter.safetensors"
        VisEditSet(copy, self.vlm.fingerprint, training=summary).save(path)
        return path

    # ------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        cfg = self.config
        t_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.say(TrainProgress("prepare", message="drawing training samples"))
        try:
            self.split = training_samples(
                self.world_dir,
                per_entity=cfg.per_entity,
                validation_fraction=cfg.validation_fraction,
                seed=cfg.seed,
                synthetic=cfg.synthetic,
                synthetic_locality=cfg.synthetic_locality,
            )
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        self.validation = random.Random(f"visedit-val-{cfg.seed}").sample(
            self.split.validation, min(cfg.validation_samples, len(self.split.validation))
        )
        self.vead_config = self.choose_layers()
        torch.manual_seed(cfg.seed)  # the initialisation does not depend on what choosing the layers drew
        vead = VEAD(self.vead_config).to(self.vlm.input_device)
        vead.train()
        opt = torch.optim.Adam(vead.parameters(), lr=cfg.lr)
        state = self.load_checkpoint(vead, opt) or {
            "step": 0,
            "best_val": None,
            "best_step": None,
            "curve": [],
            "validation": [],
            "config_key": cfg.resolved_key(),
            "seconds": 0.0,
        }
        if state["step"]:
            self.say(TrainProgress("train", state["step"], cfg.steps, message=f"resumed at step {state['step']}"))
        best_path = self.out / "adapter.safetensors"
        t_run = time.perf_counter()

        def summary() -> dict[str, Any]:
            return {
                "steps": state["step"],
                "best_step": state["best_step"],
                "best_validation_loss": state["best_val"],
                "config": asdict(cfg),
                "adapter": self.vead_config.to_dict(),
                "parameter_count": vead.parameter_count(),
                "attribution_layers": self.attribution_layers,
                "layer_evidence": self.layer_evidence,
                "data": self.split.describe(),
                "seed": cfg.seed,
                "attribution_skipped": self.attr_skipped,
                "train_seconds": round(state["seconds"] + time.perf_counter() - t_run, 1),
            }

        while state["step"] < cfg.steps:
            step = state["step"] + 1
            rng = random.Random(f"visedit-step-{cfg.seed}-{step}")
            batch = rng.sample(self.split.train, min(cfg.batch_size, len(self.split.train)))
            parts = self.losses(vead, batch, rng, grad=True)
            loss = self.total(parts)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vead.parameters(), 10.0)
            opt.step()
            state["step"] = step
            row = {"step": step, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
            state["curve"].append(row)
            self.say(
                TrainProgress(
                    "train",
                    step,
                    cfg.steps,
                    {k: round(v, 4) for k, v in row.items() if k != "step"},
                    state["best_val"],
                    state["best_step"],
                )
            )
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val = self.validate(vead)
                state["validation"].append({"step": step, **val})
                if state["best_val"] is None or val["total"] < state["best_val"]:
                    state["best_val"], state["best_step"] = val["total"], step
                    self.save_adapter(vead, summary())
                self.say(TrainProgress("validate", step, cfg.steps, val, val["total"], state["best_step"]))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                state["seconds"] = state["seconds"] + time.perf_counter() - t_run
                t_run = time.perf_counter()
                self.save_checkpoint(vead, opt, state)
                self.say(TrainProgress("checkpoint", step, cfg.steps, message=str(self._checkpoint_path())))
        result = summary()
        result["adapter_path"] = str(best_path)
        if cfg.scope_far > 0 and best_path.is_file():
            from .calibration import calibrate_world_scope

            self.say(TrainProgress("calibrate", state["step"], cfg.steps, message="calibrating the scope gate"))
            best = VisEditSet.load(best_path, self.vlm)
            scope = calibrate_world_scope(self.vlm, best.vead, self.world_dir, cfg.scope_far, seed=cfg.seed)
            best.with_scope(scope).save(best_path)
            result["scope"] = {"threshold": scope.threshold, **scope.calibration}
        result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        (self.out / "training.json").write_text(
            json.dumps({**result, "curve": state["curve"], "validation": state["validation"]}, indent=1)
        )
        try:
            result["figure"] = str(render_training(state["curve"], state["validation"], self.out / "training.png"))
        except ValueError:  # e.g. no validation yet: nothing to draw
            pass
        self.say(
            TrainProgress(
                "done", state["step"], cfg.steps, validation_loss=state["best_val"], best_step=state["best_step"]
            )
        )
        return result


def render_training(curve: list[dict], validation: list[dict], path: str | Path) -> Path:
    """Training loss (mean over each validation interval) and validation loss at every validation."""
    from diagnostics.render import render_curves

    if not validation:
        raise ValueError("no validation point to draw")
    steps = [v["step"] for v in validation]
    train, start = [], 0
    for step in steps:
        window = [r["loss"] for r in curve if start < r["step"] <= step]
        train.append(sum(window) / len(window) if window else float("nan"))
        start = step
    return render_curves(
        {"training loss (interval mean)": train, "validation loss": [v["total"] for v in validation]},
        path,
        title="VisEdit training",
        xlabel="step",
        ylabel="loss",
        x=steps,
    )


def default_adapter_path(world_dir: str | Path) -> Path:
    """Where ``editlens visedit train`` puts the adapter of a world by default."""
    from vlm.world.folder import WorldFolder

    return WorldFolder(world_dir).visedit_adapter


def train_visedit(
    vlm: VLM,
    world_dir: str | Path,
    out_dir: str | Path,
    config: VisEditTrainConfig | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Train (or resume) a VEAD on the world's training split; returns the summary, the best adapter
    in ``out_dir/adapter.safetensors``."""
    return Trainer(vlm, world_dir, out_dir, config or VisEditTrainConfig(), progress).run()
