"""Constraint routing: the training-time attention that makes the tiny model
recall visual facts through the question's constraint token, as LLaVA does.

Why it is needed
----------------
A tiny LLaVA trained naively answers straight from the image tokens at the
last position: nothing in the data rewards moving the entity's identity into
the constraint tokens ("this landmark") first, so it does not happen, and a
MultEdit edit at the constraint has nothing to change. Masks that let only
the constraint see the image teach a model that breaks once served with full
attention; mixing masked and unmasked batches, or penalising attention mass,
leaves redundant routes that work just as well (see README, "How the world
model recalls facts").

What this does
--------------
For a share of the visual training rows (``TrainConfig.route_swap_prob``),
every text position except the constraint's last token sees, in every layer,
the image tokens of *another entity of the same kind* from the same batch
instead of its own. Only the constraint's last token always sees the true
image. The attention pattern stays the full causal one the model is served
with (no position loses the image, so nothing shifts at serving time); what
changes is that reading the image anywhere but at the constraint is wrong
whenever the row is swapped, while the route image → constraint token →
answer is always right. The cheapest way to be right on every row is to take
the entity from the image at the constraint token and read the fact from
there, which is the mechanism the papers find in LLaVA (Zhang et al.: image
→ question matters, image → last hardly; Basu et al.: the early MLPs at the
constraint's last token are causal).

The image tokens' own states depend only on the image and the fixed prefix
before it (attention is causal and the image comes first), so swapping their
keys and values between rows is exactly what those positions would compute
with the other image; rotary positions match because every row has its image
at the same positions.
"""

from __future__ import annotations

import contextlib
import random
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@dataclass
class RoutePlan:
    """Which rows see another row's image, and where.

    partner: (B,) row whose image keys/values the swapped positions read; -1 = no swap.
    swapped: (B, T) bool, query positions that read the partner's image.
    image_span: (start, end) of the image tokens, the same in every row.
    """

    partner: torch.Tensor
    swapped: torch.Tensor
    image_span: tuple[int, int]
    _mask: dict = field(default_factory=dict, repr=False)  # (T, device) -> mask, shared by all layers

    def mask(self, T: int, device: torch.device) -> torch.Tensor:
        """(B, 1, T, T + n_image) boolean mask: causal keys, then the partner's image keys."""
        key = (T, str(device))
        if key not in self._mask:
            s, e = self.image_span
            B = self.partner.shape[0]
            sw = self.swapped.to(device)[:, :T]
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            own = causal.unsqueeze(0).repeat(B, 1, 1)
            own[:, :, s:e] &= ~sw[:, :, None]
            other = sw[:, :, None].expand(B, T, e - s)
            self._mask[key] = torch.cat([own, other], dim=-1)[:, None]
        return self._mask[key]


def plan_batch(
    groups: Sequence[str | None],
    entities: Sequence[str | None],
    route_pos: Sequence[int | None],
    image_spans: Sequence[tuple[int, int] | None],
    seq_len: int,
    prob: float,
    rng: random.Random,
) -> RoutePlan | None:
    """Choose the swapped rows of one batch.

    A row can be swapped when it has an image and a routing position (the
    constraint's last token) and the batch holds another entity of the same
    group (kind). Returns None when no row is swapped.
    """
    B = len(groups)
    partner = torch.full((B,), -1, dtype=torch.long)
    swapped = torch.zeros((B, seq_len), dtype=torch.bool)
    spans = {s for s in image_spans if s is not None}
    if prob <= 0 or len(spans) != 1:
        return None
    ((start, end),) = spans
    for i in range(B):
        if image_spans[i] is None or route_pos[i] is None or rng.random() >= prob:
            continue
        choices = [
            j
            for j in range(B)
            if j != i and image_spans[j] is not None and groups[j] == groups[i] and entities[j] != entities[i]
        ]
        if not choices:
            continue
        partner[i] = rng.choice(choices)
        swapped[i, end:] = True
        swapped[i, route_pos[i]] = False
    if not (partner >= 0).any():
        return None
    return RoutePlan(partner, swapped, (start, end))


def routed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: RoutePlan, scaling: float
) -> torch.Tensor:
    """Causal attention where ``plan.swapped`` queries read the partner row's image.

    query/key/value: (B, H, T, Dh). Returns (B, H, T, Dh). Assumes right
    padding (pad keys come after every real query, so causality hides them).
    """
    s, e = plan.image_span
    src = plan.partner.clamp(min=0).to(key.device)
    K = torch.cat([key, key[src, :, s:e]], dim=2)
    V = torch.cat([value, value[src, :, s:e]], dim=2)
    mask = plan.mask(query.shape[2], query.device)
    return F.scaled_dot_product_attention(query, K, V, attn_mask=mask, scale=scaling)


def _routed_forward(plan_ref: list):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        plan = plan_ref[0]
        if plan is None:
            return type(self).forward(
                self, hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
            )
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        out = routed_attention(q, k, v, plan, self.scaling)
        out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(out), None

    return forward


@contextlib.contextmanager
def constraint_routing(model) -> Iterator[list]:
    """Install routed attention on every decoder layer for the duration.

    Yields a one-element list; put a ``RoutePlan`` (or None for plain causal
    attention) in it before each forward pass. The layers get their stock
    forward back on exit.
    """
    plan_ref: list = [None]
    layers = model.model.language_model.layers
    fwd = _routed_forward(plan_ref)
    for layer in layers:
        layer.self_attn.forward = types.MethodType(fwd, layer.self_attn)
    try:
        yield plan_ref
    finally:
        for layer in layers:
            del layer.self_attn.forward
