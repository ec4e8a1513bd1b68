"""Batched activation patching: one forward pass, a different intervention per row.

Every row of a batch may

* overwrite (``mode="set"``) or add to (``mode="add"``) the state of a module
  kind at a set of layers and positions — ``hidden`` (decoder layer output,
  the residual stream), ``mlp`` (MLP output), ``attn`` (self-attention
  output), ``mlp_in`` (input of the MLP's down projection: MultEdit's key);
* overwrite or add to rows of ``inputs_embeds`` (kind ``embeds``), which is
  where visual features live: LLaVA scatters the projected image features
  into the embeddings after ``embed_tokens``, so noise on visual tokens must
  go there and not on token embeddings;
* block attention from target to source positions in chosen layers
  (attention knockout), through an explicit additive mask per layer;

and the run may capture any (kind, layer) state of every row, e.g. to cache
a clean run whose states are restored into corrupted runs later.

Positions are absolute token indices of the right-padded batch (see
``prompts.collate``). The engine never changes weights: hooks live only for
the duration of one call.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from .hooks import Hooks
from .loading import VLM
from .positions import position_ids, span

STATE_KINDS = ("hidden", "mlp", "attn", "mlp_in", "embeds")
# captured only: the attention input (the normed layer input) and, under
# eager attention, the attention probabilities (B, heads, T, T)
CAPTURE_ONLY_KINDS = ("attn_in", "attn_probs")


@dataclass
class Patch:
    """Overwrite or add ``values`` at (row, kind, layers, positions).

    ``values`` has shape (P, d) — used at every layer — or (len(layers), P, d).
    ``layers`` is ignored for kind ``embeds``.
    """

    row: int
    kind: str
    positions: Sequence[int]
    values: torch.Tensor
    layers: Sequence[int] = ()
    mode: str = "set"


@dataclass
class Knockout:
    """In ``layers``, positions ``targets`` of ``row`` may not attend to ``sources``."""

    row: int
    layers: Sequence[int]
    targets: Sequence[int]
    sources: Sequence[int]


@dataclass
class PatchedRun:
    hidden: torch.Tensor  # (B, T, d) final normed hidden states
    captured: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    lm_head: torch.nn.Module | None = None

    def logits_at(self, rows: Sequence[int] | torch.Tensor, positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits (n, V) at (rows[i], positions[i]) — the head runs only where asked."""
        r = torch.as_tensor(rows, dtype=torch.long, device=self.hidden.device)
        p = torch.as_tensor(positions, dtype=torch.long, device=self.hidden.device)
        h = self.hidden[r, p]
        return self.lm_head(h.to(self.lm_head.weight.dtype)).float()


class _Group:
    """All writes to one (kind, layer) site, vectorised: rows, positions, values."""

    def __init__(self) -> None:
        self.set_idx: list[tuple[int, int]] = []
        self.set_vals: list[torch.Tensor] = []
        self.add_idx: list[tuple[int, int]] = []
        self.add_vals: list[torch.Tensor] = []

    def add(self, row: int, positions: Sequence[int], values: torch.Tensor, mode: str) -> None:
        if mode not in ("set", "add"):
            raise ValueError(f"patch mode must be 'set' or 'add', not {mode!r}")
        idx, vals = (self.set_idx, self.set_vals) if mode == "set" else (self.add_idx, self.add_vals)
        idx.extend((row, int(p)) for p in positions)
        vals.append(values)

    def finalize(self, device: torch.device):
        out = []
        for idx, vals, mode in ((self.set_idx, self.set_vals, "set"), (self.add_idx, self.add_vals, "add")):
            if idx:
                t = torch.tensor(idx, dtype=torch.long, device=device)
                out.append((mode, t[:, 0], t[:, 1], torch.cat([v.reshape(-1, v.shape[-1]) for v in vals]).to(device)))
        return out

    def apply(self, t: torch.Tensor, ops) -> torch.Tensor:
        t = t.clone()
        for mode, rows, pos, vals in ops:
            vals = vals.to(t.dtype)
            if mode == "set":
                t[rows, pos] = vals
            else:
                t = t.index_put((rows, pos), vals, accumulate=True)
        return t


def _check_positions(kind: str, row: int, positions: Sequence[int], lengths: torch.Tensor, offset: int = 0) -> None:
    if row < 0 or row >= len(lengths):
        raise IndexError(f"{kind} intervention for row {row}, but the batch has {len(lengths)} rows")
    n = int(lengths[row])
    bad = [p for p in positions if not offset <= int(p) < n]
    if bad:
        where = (
            f"row {row} of length {n}"
            if not offset
            else f"positions {offset}..{n - 1} of row {row} (the rest is a cached prefix)"
        )
        raise IndexError(f"{kind} intervention at positions {bad} outside {where}")


def _knockout_masks(
    knockouts: Sequence[Knockout], attention_mask: torch.Tensor, dtype: torch.dtype, num_layers: int, offset: int = 0
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: an additive (B, 1, T - offset, T) mask — causal + padding + the layer's knockouts — and the
    (B, 1, T - offset, T) bool mask of the knocked-out pairs alone.

    Rows are the query positions offset..T-1 (a suffix run over a cached prefix
    has only those); columns are all key positions.
    """
    B, T = attention_mask.shape
    device = attention_mask.device
    neg = torch.finfo(dtype).min
    q = torch.arange(offset, T, device=device)
    causal = q[:, None] >= torch.arange(T, device=device)[None, :]
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    by_layer: dict[int, list[Knockout]] = defaultdict(list)
    for k in knockouts:
        for layer in k.layers:
            if not 0 <= layer < num_layers:
                raise IndexError(f"knockout layer {layer} outside 0..{num_layers - 1}")
            by_layer[layer].append(k)
    masks = {}
    for layer, ks in by_layer.items():
        blocked = torch.zeros_like(allowed)
        for k in ks:
            if not len(k.targets) or not len(k.sources):
                continue
            t = torch.as_tensor(list(k.targets), dtype=torch.long, device=device) - offset
            s = torch.as_tensor(list(k.sources), dtype=torch.long, device=device)
            blocked[k.row, t[:, None], s[None, :]] = True
        m = torch.zeros(B, 1, T - offset, T, dtype=dtype, device=device)
        m.masked_fill_(~(allowed & ~blocked)[:, None], neg)
        masks[layer] = (m, blocked[:, None])
    return masks


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once every requested state exists."""


def _group_patches(vlm: VLM, patches: Iterable[Patch], lengths: torch.Tensor, offset: int) -> dict:
    groups: dict[tuple[str, int], _Group] = defaultdict(_Group)
    for p in patches:
        if p.kind not in STATE_KINDS:
            raise ValueError(f"unknown state kind {p.kind!r}; expected one of {STATE_KINDS}")
        _check_positions(p.kind, p.row, p.positions, lengths, offset)
        layers = [-1] if p.kind == "embeds" else list(p.layers)
        if not layers:
            raise ValueError(f"a {p.kind} patch needs at least one layer")
        vals = p.values
        if vals.dim() == 2:
            vals = vals.unsqueeze(0).expand(len(layers), *vals.shape)
        if vals.shape[0] != len(layers) or vals.shape[1] != len(p.positions):
            raise ValueError(
                f"patch values of shape {tuple(p.values.shape)} do not fit "
                f"{len(layers)} layers x {len(p.positions)} positions"
            )
        for li, layer in enumerate(layers):
            if p.kind != "embeds" and not 0 <= layer < vlm.num_layers:
                raise IndexError(f"layer {layer} outside 0..{vlm.num_layers - 1}")
            groups[(p.kind, layer)].add(p.row, [int(q) - offset for q in p.positions], vals[li], p.mode)
    return groups


# ------------------------------------------------------------------ hook points
# Each state kind is read (and written) at one hook point: the module it hangs on, whether it is a
# pre-hook, and how the state is taken from / put back into the call. One table instead of a branch
# per kind; ``interventions`` installs one hook per (kind, layer) site through ``vlm.hooks.Hooks``.
Keep = Callable[[tuple[str, int], torch.Tensor], None]


def _replace(grp: _Group | None, ops, t: torch.Tensor) -> torch.Tensor:
    return grp.apply(t, ops) if ops else t


def _embeds_hook(key, grp, ops, keep: Keep):
    def pre(mod, args, kwargs):
        e = _replace(grp, ops, kwargs["inputs_embeds"])
        kwargs["inputs_embeds"] = e
        keep(key, e)
        return args, kwargs

    return pre


def _mlp_in_hook(key, grp, ops, keep: Keep):
    def pre(mod, args):
        x = _replace(grp, ops, args[0])
        keep(key, x)
        return (x, *args[1:])

    return pre


def _attn_in_hook(key, grp, ops, keep: Keep):
    def pre(mod, args, kwargs):
        keep(key, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    return pre


def _attn_probs_hook(key, grp, ops, keep: Keep):
    def post(mod, args, out):
        if out[1] is None:
            raise RuntimeError("attention probabilities need eager attention; wrap the call in eager_attention(vlm)")
        keep(key, out[1])

    return post


def _output_hook(key, grp, ops, keep: Keep):
    def post(mod, args, out):
        t = _replace(grp, ops, out[0] if isinstance(out, tuple) else out)
        keep(key, t)
        return (t, *out[1:]) if isinstance(out, tuple) else t

    return post


@dataclass(frozen=True)
class _HookPoint:
    module: Callable[[VLM, int], torch.nn.Module]  # (vlm, layer) -> the module the hook hangs on
    make: Callable  # (key, group, ops, keep) -> the hook function
    pre: bool = False
    with_kwargs: bool = False


def _layer_module(kind: str) -> Callable[[VLM, int], torch.nn.Module]:
    return lambda vlm, layer: vlm.module(vlm.arch.module_path(kind, layer))


HOOK_POINTS: dict[str, _HookPoint] = {
    "embeds": _HookPoint(lambda vlm, _: vlm.module(vlm.arch.language_model), _embeds_hook, True, True),
    "mlp_in": _HookPoint(_layer_module("down_proj"), _mlp_in_hook, True),
    "attn_in": _HookPoint(_layer_module("attn"), _attn_in_hook, True, True),
    "attn_probs": _HookPoint(_layer_module("attn"), _attn_probs_hook),
    "hidden": _HookPoint(_layer_module("hidden"), _output_hook),
    "mlp": _HookPoint(_layer_module("mlp"), _output_hook),
    "attn": _HookPoint(_layer_module("attn"), _output_hook),
}
assert set(HOOK_POINTS) == set(STATE_KINDS + CAPTURE_ONLY_KINDS)


def _knockout_hook(mask: torch.Tensor, blocked: torch.Tensor):
    """The attention module's mask with the knocked-out pairs removed. It starts from the mask the model built
    for the layer where there is one (Gemma 3 lets image tokens attend to each other both ways; sliding-window
    layers see less) and from causal + padding where the model passes none (SDPA's causal shortcut)."""

    def pre(mod, args, kwargs):
        own = kwargs.get("attention_mask")
        if (
            isinstance(own, torch.Tensor)
            and own.dim() == 4
            and own.shape[-2] == mask.shape[-2]
            and (
                own.shape[-1] == mask.shape[-1]
                or (own.shape[-1] < mask.shape[-1] and getattr(mod, "sliding_window", None))
            )
        ):
            # the model's mask covers the keys the layer holds: all positions, or — a sliding-window layer
            # continuing from a cache that keeps only its window — the last K of them
            shape = (*mask.shape[:-1], own.shape[-1])
            neg = torch.finfo(mask.dtype).min
            if own.dtype == torch.bool:
                m = torch.zeros(shape, dtype=mask.dtype, device=mask.device).masked_fill_(~own, neg)
            else:
                m = own.to(mask.dtype).expand(shape).clone()
            kwargs["attention_mask"] = m.masked_fill_(blocked[..., mask.shape[-1] - own.shape[-1] :], neg)
        else:
            kwargs["attention_mask"] = mask
        return args, kwargs

    return pre


def _stop_hook(mod, args, out):
    raise _StopForward


@contextmanager
def interventions(
    vlm: VLM,
    attention_mask: torch.Tensor,
    patches: Iterable[Patch] = (),
    capture: Iterable[tuple[str, int]] = (),
    knockouts: Sequence[Knockout] = (),
    grad: bool = False,
    offset: int = 0,
    stop_after_layer: int | None = None,
) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
    """Install the hooks of one patched forward pass; yields the dict that captures fill.

    ``attention_mask`` is the (B, T) mask of the whole sequence. With
    ``offset`` > 0 the forward pass computes only positions offset..T-1 (a
    cached prefix holds the rest): positions stay absolute in patches,
    knockouts and the returned captures' meaning, and touching the prefix is
    an error. ``stop_after_layer`` ends the pass (``_StopForward``) once that
    decoder layer has run; ``run_*`` catch it. Every hook is removed when the
    block ends, and also when installing one of them fails.
    """
    device = attention_mask.device
    lengths = attention_mask.sum(dim=1)
    groups = _group_patches(vlm, patches, lengths, offset)
    for k in knockouts:
        _check_positions("knockout target", k.row, list(k.targets), lengths, offset)
        _check_positions("knockout source", k.row, list(k.sources), lengths)
    captured: dict[tuple[str, int], torch.Tensor] = {}
    capture_set = set(capture)
    unknown = sorted({kind for kind, _ in capture_set} - set(HOOK_POINTS))
    if unknown:
        raise ValueError(f"unknown state kind(s) {unknown}; expected one of {tuple(HOOK_POINTS)}")

    def keep(key, t):
        if key in capture_set:
            captured[key] = t if grad else t.detach()

    with Hooks() as hooks:
        for key in sorted(set(groups) | capture_set):
            kind, layer = key
            point, grp = HOOK_POINTS[kind], groups.get(key)
            ops = grp.finalize(device) if grp is not None else []
            hooks.add(
                point.module(vlm, layer), point.make(key, grp, ops, keep), pre=point.pre, with_kwargs=point.with_kwargs
            )
        if knockouts:
            masks = _knockout_masks(knockouts, attention_mask, vlm.dtype, vlm.num_layers, offset)
            for layer, (mask, blocked) in masks.items():
                hooks.add(
                    vlm.module(vlm.arch.module_path("attn", layer)),
                    _knockout_hook(mask, blocked),
                    pre=True,
                    with_kwargs=True,
                )
        if stop_after_layer is not None:
            hooks.add(vlm.module(vlm.arch.layer_path(stop_after_layer)), _stop_hook)
        yield captured


def run_patched(
    vlm: VLM,
    inputs: dict[str, torch.Tensor],
    patches: Iterable[Patch] = (),
    capture: Iterable[tuple[str, int]] = (),
    knockouts: Sequence[Knockout] = (),
    grad: bool = False,
    stop_after_layer: int | None = None,
) -> PatchedRun:
    """One forward pass of ``inputs`` (from ``prompts.collate``) with per-row interventions.

    With ``stop_after_layer`` the pass ends after that decoder layer: only
    captures up to it exist and ``hidden`` is None.
    """
    model, arch = vlm.model, vlm.arch
    device = vlm.input_device
    inputs = {k: v.to(device, vlm.dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    if vlm.arch.rope != "1d" and "position_ids" not in inputs:
        inputs["position_ids"] = position_ids(vlm, inputs)
    hidden = None
    with ExitStack() as stack:
        captured = stack.enter_context(
            interventions(
                vlm, inputs["attention_mask"], patches, capture, knockouts, grad=grad, stop_after_layer=stop_after_layer
            )
        )
        if not grad:
            stack.enter_context(torch.no_grad())
        try:
            hidden = arch.get(model, arch.base_model)(**inputs, use_cache=False).last_hidden_state
        except _StopForward:
            pass
    return PatchedRun(hidden=hidden, captured=captured, lm_head=arch.get(model, arch.lm_head))


@dataclass
class PrefixCache:
    """The key/value cache of positions 0..length-1 of one sequence, computed once.

    Every row of a later ``run_suffix`` call continues from it: what lies
    before the first position any intervention touches is the same in every
    row, so it need not be recomputed (image tokens included).
    """

    length: int
    cache: object

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        vlm: VLM,
        embeds: torch.Tensor,
        length: int,
        positions: torch.Tensor | None = None,
        token_inputs: dict[str, torch.Tensor] | None = None,
    ) -> PrefixCache:
        """``embeds``: (1, T, d) input embeddings of the language model (image features in place);
        ``positions``: the sequence's position ids from ``vlm.positions.position_ids`` (default 0..T-1);
        ``token_inputs``: the sequence's per-token image marks from ``collate`` (``token_type_ids``), with which
        a family whose image tokens attend both ways (Gemma 3) builds its own mask over the prefix."""
        if not 0 < length < embeds.shape[1]:
            raise ValueError(f"a prefix must be 1..{embeds.shape[1] - 1} positions long, not {length}")
        e = embeds[:, :length].to(vlm.input_device, vlm.dtype)
        if positions is None:
            positions = torch.arange(embeds.shape[1])[None]
        out = _language_pass(
            vlm,
            e,
            torch.ones(1, length, dtype=torch.long, device=e.device),
            span(positions, 0, length, 1).to(e.device),
            {k: v[:, :length] for k, v in (token_inputs or {}).items()},
            cache=None,
            use_cache=True,
        )
        return cls(length=length, cache=getattr(out, "cache", None) or out.past_key_values)

    def expanded(self, rows: int):
        """A cache for ``rows`` rows continuing from the prefix. The prefix's keys and values are broadcast
        views, not copies: the run's first update concatenates them with the suffix's, which is the one copy
        attention needs (a repeated copy first would double it: measured 0.34 s of a 2.3 s trace grid at
        LLaVA-1.5's 576 image tokens)."""
        c = copy.deepcopy(self.cache)
        for layer in getattr(c, "layers", []):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)) or keys.shape[0] != 1:
                c = copy.deepcopy(self.cache)  # a cache of another layout: the plain repeat
                c.batch_repeat_interleave(rows)
                return c
            layer.keys = keys.expand(rows, *keys.shape[1:])
            layer.values = values.expand(rows, *values.shape[1:])
        return c


def _language_pass(vlm: VLM, embeds, mask, positions, token_inputs, cache, use_cache: bool):
    """The language model on input embeddings. A family whose image tokens attend to each other both ways
    (Gemma 3) runs through its base model with the per-token image marks, so that the model builds its own
    mask; only a run with no cached prefix or whose queries are text may go straight to the language model."""
    kwargs = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, "use_cache": use_cache}
    if cache is not None:
        kwargs["cache"] = cache
    if vlm.arch.image_attention == "bidirectional" and cache is None:
        if not token_inputs:
            raise ValueError(
                f"a {vlm.arch.family} model's image tokens attend to each other both ways: give the prompt's "
                "per-token image marks (token_inputs / the token_type_ids from collate)"
            )
        return vlm.arch.get(vlm.model, vlm.arch.base_model)(**kwargs, **token_inputs)
    return vlm.arch.get(vlm.model, vlm.arch.language_model)(**kwargs)


def run_suffix(
    vlm: VLM,
    embeds: torch.Tensor,
    prefix: PrefixCache | None,
    patches: Iterable[Patch] = (),
    capture: Iterable[tuple[str, int]] = (),
    knockouts: Sequence[Knockout] = (),
    stop_after_layer: int | None = None,
    positions: torch.Tensor | None = None,
    token_inputs: dict[str, torch.Tensor] | None = None,
) -> PatchedRun:
    """Positions prefix.length..T-1 of B rows over a shared cached prefix, with interventions.

    With ``prefix`` None the whole sequence runs (from the embeddings, so the
    vision tower is not run again).

    ``embeds`` (B, T, d) are whole-sequence input embeddings (rows of equal
    length, no padding); only their suffix is fed. Positions in patches,
    knockouts and ``PatchedRun.logits_at`` stay absolute; ``hidden`` holds
    the suffix only and ``logits_at`` translates. ``positions``: the sequence's position ids (one row, from
    ``vlm.positions.position_ids``; default 0..T-1), the same for every row; ``token_inputs``: its per-token
    image marks (one row, from ``collate``), which a family whose image tokens attend both ways needs when the
    run covers the image (then without a prefix: a prefix must end before the image or after it).
    """
    B, T, _ = embeds.shape
    P = prefix.length if prefix is not None else 0
    device = vlm.input_device
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    hidden = None
    with ExitStack() as stack:
        captured = stack.enter_context(
            interventions(vlm, mask, patches, capture, knockouts, offset=P, stop_after_layer=stop_after_layer)
        )
        stack.enter_context(torch.no_grad())
        try:
            hidden = _language_pass(
                vlm,
                embeds[:, P:].to(device, vlm.dtype),
                mask,
                span(positions if positions is not None else torch.arange(T)[None], P, T, B).to(device),
                {k: v[:, P:].expand(B, -1).to(device) for k, v in (token_inputs or {}).items()},
                cache=prefix.expanded(B) if prefix is not None else None,
                use_cache=prefix is not None,
            ).last_hidden_state
        except _StopForward:
            pass
    if hidden is not None and P:
        hidden = torch.cat([hidden.new_zeros(B, P, hidden.shape[-1]), hidden], dim=1)
    return PatchedRun(hidden=hidden, captured=captured, lm_head=vlm.arch.get(vlm.model, vlm.arch.lm_head))


@contextmanager
def eager_attention(vlm: VLM) -> Iterator[None]:
    """Run the language model with eager attention, whose modules return their probabilities."""
    cfg = vlm.model.config.get_text_config()
    before = cfg._attn_implementation
    vlm.model.set_attn_implementation({"text_config": "eager"} if before != "eager" else before)
    try:
        yield
    finally:
        if before != "eager":
            vlm.model.set_attn_implementation({"text_config": before})
