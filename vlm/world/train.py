"""Training the world's tiny but genuine vision-language model.

The default model is a stock LLaVA: a CLIP vision tower (class token + 16
patch tokens, features from the second-to-last layer with the class token
dropped, as LLaVA-1.5 does), a two-layer GELU projector and a Llama decoder.
``ModelConfig.family="qwen2_vl"`` trains a stock Qwen2-VL instead: its
vision transformer (8-pixel patches, 2×2 merged into one of 16 image tokens
by its merger) and a Qwen2 decoder with M-RoPE positions, at the same
widths and depths. Either is trained from scratch, jointly, on the world's
training questions with the loss on the answer tokens and the
end-of-sequence token, under constraint routing (``routing.py``) and with
the subject-enrichment loss, so that it recalls visual facts through the
question's constraint tokens as LLaVA does (README: "How the world model
recalls facts").
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from ..images import ProcessedImage, batch_images
from ..prompts import EncodedPrompt, encode, token_type_inputs
from ..reproducible import deterministic
from .render import IMAGE_SIZE
from .routing import RoutePlan, constraint_routing, plan_batch

ProgressFn = Callable[[int, int, float], None]


#: the families a world can be trained in
WORLD_FAMILIES = ("llava", "qwen2_vl")


@dataclass(frozen=True)
class ModelConfig:
    family: str = "llava"
    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4
    intermediate_size: int = 512
    vision_hidden_size: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate_size: int = 256
    patch_size: int = 16


@dataclass(frozen=True)
class TrainConfig:
    vision_pretrain_steps: int = 400
    vision_pretrain_batch: int = 128
    vision_pretrain_lr: float = 2e-3
    steps: int = 1500
    freeze_vision: bool = True  # as LLaVA-1.5: the (pretrained) vision tower stays frozen
    batch_size: int = 32
    lr: float = 2.5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    route_swap_prob: float = 0.5  # constraint routing (routing.py); 0 trains the naive model
    enrich_layer: int = 3  # subject enrichment: attributes readable at the subject after this layer
    enrich_weight: float = 0.5  # weight of the enrichment loss; 0 switches it off


def key_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The model config as it enters a build key (the LLaVA world's key predates ``family``)."""
    d = asdict(cfg)
    if d["family"] == "llava":
        del d["family"]
    return d


def make_model(vocab_size: int, special: dict[str, int], cfg: ModelConfig, seed: int):
    """A freshly initialised tiny model of ``cfg.family``: LLaVA (CLIP tower, GELU projector, Llama decoder) or
    Qwen2-VL (its vision transformer and merger, a Qwen2 decoder)."""
    if cfg.family not in WORLD_FAMILIES:
        raise ValueError(f"a world cannot be trained in {cfg.family!r}; families: {', '.join(WORLD_FAMILIES)}")
    torch.manual_seed(seed)
    if cfg.family == "qwen2_vl":
        return _make_qwen2_vl(vocab_size, special, cfg)
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_intermediate_size,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=128,
        pad_token_id=special["pad"],
        bos_token_id=special["bos"],
        eos_token_id=special["eos"],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=special["image"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(IMAGE_SIZE // cfg.patch_size) ** 2,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = special["pad"]
    model.generation_config.eos_token_id = special["eos"]
    model.generation_config.bos_token_id = special["bos"]
    return model


def _make_qwen2_vl(vocab_size: int, special: dict[str, int], cfg: ModelConfig):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    half = cfg.hidden_size // cfg.num_heads // 2  # M-RoPE: each head's rotary half split into (t, h, w)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_heads,
            "max_position_embeddings": 128,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8],
            },
            "pad_token_id": special["pad"],
            "bos_token_id": special["bos"],
            "eos_token_id": special["eos"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": cfg.vision_layers,
            "embed_dim": cfg.vision_hidden_size,
            "hidden_size": cfg.hidden_size,
            "num_heads": cfg.vision_heads,
            "mlp_ratio": cfg.vision_intermediate_size // cfg.vision_hidden_size,
            "patch_size": cfg.patch_size // 2,  # merged 2x2: one image token per patch_size² pixels, as LLaVA's
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=special["image"],
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = special["pad"]
    model.generation_config.eos_token_id = special["eos"]
    model.generation_config.bos_token_id = special["bos"]
    return model


def vision_parts(model) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """(the whole vision side, the parts frozen after pretraining): LLaVA's CLIP tower (its projector stays
    trainable); Qwen2-VL's patch embedding and blocks (its merger, the projector, stays trainable)."""
    if hasattr(model.model, "visual"):
        v = model.model.visual
        return v, [v.patch_embed, v.blocks]
    return model.model.vision_tower, [model.model.vision_tower]


def image_features(model, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, d) mean feature of each image, as the language model will read it: LLaVA's CLIP patch features of
    the selected layer (class token dropped); Qwen2-VL's merged tokens."""
    if hasattr(model.model, "visual"):
        grid = pixels["image_grid_thw"]
        out = model.model.visual(pixels["pixel_values"], grid_thw=grid).pooler_output
        per = (grid.prod(-1) // model.model.visual.spatial_merge_size**2).tolist()
        return torch.stack([f.mean(0) for f in torch.split(out, per)])
    layer = model.config.vision_feature_layer
    return (
        model.model.vision_tower(pixels["pixel_values"], output_hidden_states=True).hidden_states[layer][:, 1:].mean(1)
    )


class Example:
    """A training example: an encoded prompt+answer, the targets (answer + EOS),
    and what constraint routing needs: the entity, its group (kind) and the
    routing position (the visual constraint's last token, if any)."""

    __slots__ = ("prompt", "ids", "targets", "entity", "group", "subject_pos", "route_pos", "attributes")

    def __init__(self, prompt: EncodedPrompt, eos_id: int, entity: str | None = None, attributes: Sequence[int] = ()):
        self.prompt = prompt
        self.ids = torch.cat([prompt.input_ids, torch.tensor([eos_id])])
        self.targets = list(prompt.answer_positions) + [len(prompt.input_ids)]
        self.entity = entity
        self.group = entity.split("-")[0] if entity else None
        # the subject's last token: the visual constraint ("this landmark") or the entity's name
        self.subject_pos = prompt.constraint_last if entity and prompt.constraint_spans else None
        self.route_pos = self.subject_pos if prompt.image_span is not None else None
        self.attributes = list(attributes) if self.subject_pos is not None else []


def encode_items(processor, items, pixel_cache: dict[str, ProcessedImage]) -> list[EncodedPrompt]:
    """The world's questions (with their answers) as encoded prompts; images from ``pixel_cache``."""
    out = []
    for it in items:
        pv = pixel_cache[it.image] if it.image else None
        out.append(encode(processor, it.question, answer=it.answer, constraints=it.constraints, pixel_values=pv))
    return out


def _batch(examples: Sequence[Example], pad_id: int):
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, pos, tgt = [], [], []
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
        for t in e.targets:
            rows.append(i)
            pos.append(t - 1)
            tgt.append(int(e.ids[t]))
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        **token_type_inputs([e.prompt for e in examples], T, left=False),
    }
    images = [e.prompt.image for e in examples if e.prompt.image is not None]
    if images:
        inputs.update(batch_images(images))
    return inputs, torch.tensor(rows), torch.tensor(pos), torch.tensor(tgt)


def _plan(examples: Sequence[Example], seq_len: int, prob: float, rng: random.Random) -> RoutePlan | None:
    return plan_batch(
        [e.group for e in examples],
        [e.entity for e in examples],
        [e.route_pos for e in examples],
        [e.prompt.image_span for e in examples],
        seq_len,
        prob,
        rng,
    )


@deterministic()
def train_model(
    model,
    examples: list[Example],
    pad_id: int,
    cfg: TrainConfig,
    seed: int,
    progress: ProgressFn | None = None,
) -> list[dict[str, float]]:
    """Train in place; returns the loss curve (every 50 steps)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    if cfg.freeze_vision:
        for part in vision_parts(model)[1]:
            part.requires_grad_(False)
            part.eval()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

    order: list[int] = []
    curve, running, t0 = [], 0.0, time.time()
    route_rng = random.Random(f"route-{seed}")
    with constraint_routing(model) as plan_ref:
        for step in range(cfg.steps):
            loss = _train_step(
                model, opt, trainable, examples, order, rng, route_rng, plan_ref, pad_id, cfg, lr_at(step)
            )
            running += loss
            if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
                n = (step % 50) + 1
                curve.append({"step": step + 1, "loss": running / n, "seconds": round(time.time() - t0, 1)})
                running = 0.0
            if progress:
                progress(step + 1, cfg.steps, loss)
    model.eval()
    model.requires_grad_(True)
    return curve


def _train_step(model, opt, trainable, examples, order, rng, route_rng, plan_ref, pad_id, cfg, lr) -> float:
    if len(order) < cfg.batch_size:
        perm = list(range(len(examples)))
        rng.shuffle(perm)
        order += perm
    batch = [examples[i] for i in order[: cfg.batch_size]]
    del order[: cfg.batch_size]
    inputs, rows, pos, tgt = _batch(batch, pad_id)
    plan_ref[0] = _plan(batch, inputs["input_ids"].shape[1], cfg.route_swap_prob, route_rng)
    for g in opt.param_groups:
        g["lr"] = lr
    enrich = cfg.enrich_weight > 0 and any(e.attributes for e in batch)
    out = model.model(**inputs, use_cache=False, output_hidden_states=enrich)
    logits = model.lm_head(out.last_hidden_state[rows, pos])
    loss = torch.nn.functional.cross_entropy(logits, tgt)
    if enrich:
        n_layers = len(out.hidden_states) - 1
        layer = max(0, min(cfg.enrich_layer, n_layers // 2 - 1))  # never past the first half (small test configs)
        loss = loss + cfg.enrich_weight * _enrichment_loss(model, out.hidden_states[layer + 1], batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for _, p in trainable], cfg.grad_clip)
    opt.step()
    return loss.item()


def _enrichment_loss(model, hidden: torch.Tensor, batch: Sequence[Example]) -> torch.Tensor:
    """Subject enrichment, the form LLMs give facts (Geva et al. 2023): after the
    early layers, the subject's last token already carries every attribute of
    the entity, readable through the output embedding (the logit lens). Cross
    entropy of the logit lens at the subject towards each attribute's first
    token, averaged over attributes."""
    rows, pos, tgt = [], [], []
    for i, e in enumerate(batch):
        for a in e.attributes:
            rows.append(i)
            pos.append(e.subject_pos)
            tgt.append(a)
    h = model.model.language_model.norm(hidden[torch.tensor(rows), torch.tensor(pos)])
    return torch.nn.functional.cross_entropy(model.lm_head(h), torch.tensor(tgt))


@deterministic()
def pretrain_vision(
    model,
    pixels: list[ProcessedImage],
    labels: dict[str, torch.Tensor],
    cfg: TrainConfig,
    seed: int,
    progress: ProgressFn | None = None,
) -> list[dict[str, float]]:
    """Stage 0, the stand-in for CLIP pretraining: teach the vision tower to see.

    LLaVA starts from a pretrained CLIP; ours starts from scratch, so before
    the joint training the tower learns to predict every visual attribute of
    an entity (kind, shape, colour, accent colour, pattern) from the mean of
    the patch features that LLaVA will read (second-to-last layer). Attributes
    rather than identities, so that the features also describe entities whose
    facts the language model never learns (insertion edits).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tower = vision_parts(model)[0]
    d = model.config.vision_config.hidden_size  # LLaVA: the CLIP width; Qwen2-VL: the merger's output width
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(d, int(v.max()) + 1) for k, v in labels.items()})
    opt = torch.optim.AdamW(
        list(tower.parameters()) + list(heads.parameters()), lr=cfg.vision_pretrain_lr, weight_decay=0.01
    )
    tower.train()
    curve, running = [], 0.0
    for step in range(cfg.vision_pretrain_steps):
        idx = torch.randint(0, len(pixels), (cfg.vision_pretrain_batch,), generator=gen)
        hs = image_features(model, batch_images([pixels[i] for i in idx.tolist()]))
        loss = sum(torch.nn.functional.cross_entropy(h(hs), labels[k][idx]) for k, h in heads.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if (step + 1) % 50 == 0 or step + 1 == cfg.vision_pretrain_steps:
            curve.append({"step": step + 1, "loss": running / ((step % 50) + 1)})
            running = 0.0
        if progress:
            progress(step + 1, cfg.vision_pretrain_steps, loss.item())
    return curve


def config_dict(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    """The model and training configs as one JSON-ready dict (part of the build key)."""
    return {"model": key_dict(model_cfg), "train": asdict(train_cfg)}
