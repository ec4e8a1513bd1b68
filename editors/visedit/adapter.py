"""The Visual Edit ADapter (VEAD) of VisEdit (Chen et al. §4.2), and how it sits in the model.

VEAD sits at the input of decoder layer ``l_e`` and changes only the visual
positions there. An edit is its *signal*: the hidden states h̄ (N_e × d) of
the edit sample (image_e, prompt_e ⊕ answer_e) read at the input of layer
``signal_layer`` of the unedited model, and h̄_last, the row of the edit
prompt's last token (the one that predicts the answer). For an input whose
visual states at l_e are h (N_v × d):

    ḣ = softmax(h W1 (h̄ W2)ᵀ / √d_a) h̄ W3           (eq. 14, with biases)
    C = sigmoid(f1(h) · f2(h̄_last)ᵀ)                  (eq. 15; f1, f2 two-layer MLPs to d_a)
    h ← h + ḣ ⊙ C                                     (eq. 16)

The 1/√d_a is the usual attention temperature (the paper omits it; it is a
rescaling of W1, so the family of functions is the same, but training is
steadier). Every input of the adapter (h, h̄, h̄_last) is scaled to unit RMS
per row and ḣ is multiplied back by the RMS of each visual state: on the
world's model the image embeddings have norm ≈ 100 and the text embeddings
≈ 0.6, and an adapter that works in units of the state it changes trains in
minutes instead of not at all (README, "VisEdit"). This too keeps the
paper's function family, reparametrised. With several live edits every signal e adds its own ḣ_e ⊙ C_e:
each edit is gated by its own influence mapper, so an input unrelated to
every edit keeps its visual states.

``signal_layer`` is the paper's l_e unless set. On LLaVA-1.5 the paper puts
both at layer 18; on a model whose image is read only in its first layer
(the embedded world model, see ``diagnostics.recommend``) the adapter must sit
at layer 0, where the prompt's last token has not read anything yet, so its
signal is taken deeper (README, "VisEdit").

Attaching (``AttachedVEAD``) installs thread-scoped hooks (``vlm.hooks``):
one on the base model that records which positions hold image tokens, one on
decoder layer l_e that adds the adapter's output there. Removing them leaves
the base model exactly as it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from vlm.hooks import Hooks, Rows
from vlm.loading import VLM

SUMMARY_TOKENS = ("last", "constraint", "image")
SIGNAL_ROWS = ("all", "text")


@dataclass(frozen=True)
class VEADConfig:
    hidden_size: int  # d of the language model
    layer: int  # l_e: the adapter changes the visual states at the input of this decoder layer
    signal_layer: int  # the edit signal is read at the input of this decoder layer (paper: = layer)
    width: int = 128  # d_a (paper: 1024 for 7B models)
    heads: int = 1  # cross-attention heads (paper: 1); more heads add an output projection
    summary_layer: int | None = None  # where h̄_last (the mapper's key) is read; None: signal_layer (paper)
    summary_token: str = "last"  # the mapper's key: the "last" prompt token's row (paper), the
    # "constraint"'s last token's, or the mean of the "image" rows
    mapper_context: bool = False  # f1 sees each visual state and the image's mean state (paper: the state)
    mapper_tied: bool = False  # one MLP for both sides of the mapper (needs the image key and context):
    # C = sigmoid(f([h_n, mean h]) · f([mean h̄, mean h̄]) / √d_a + b)
    signal_rows: str = "all"  # which rows of the edit sample a signal keeps: "all" (paper) or "text" (not the
    # image's: the cross-attention reads them little, and at 576 image tokens they are 95 % of the bytes)

    @property
    def last_layer(self) -> int:
        return self.signal_layer if self.summary_layer is None else self.summary_layer

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VEADConfig:
        summary = d.get("summary_layer")
        return cls(
            **{k: int(d[k]) for k in ("hidden_size", "layer", "signal_layer", "width")},
            heads=int(d.get("heads", 1)),
            summary_layer=None if summary is None else int(summary),
            summary_token=str(d.get("summary_token", "last")),
            mapper_context=bool(d.get("mapper_context", False)),
            mapper_tied=bool(d.get("mapper_tied", False)),
            signal_rows=str(d.get("signal_rows", "all")),
        )

    def check(self, num_layers: int, hidden_size: int) -> None:
        if self.hidden_size != hidden_size:
            raise ValueError(f"the adapter is for hidden size {self.hidden_size}, the model has {hidden_size}")
        for name in ("layer", "signal_layer", "last_layer"):
            v = getattr(self, name)
            if not 0 <= v < num_layers:
                raise ValueError(f"VEAD {name} {v} is outside 0..{num_layers - 1}")
        if self.width < 1:
            raise ValueError("the adapter width d_a must be positive")
        if self.mapper_tied and not (self.mapper_context and self.summary_token == "image"):
            raise ValueError(
                "a tied influence mapper compares images: it needs summary_token='image' and mapper_context"
            )
        if self.signal_rows not in SIGNAL_ROWS:
            raise ValueError(f"signal_rows must be one of {SIGNAL_ROWS}, not {self.signal_rows!r}")
        if self.summary_token not in SUMMARY_TOKENS:
            raise ValueError(f"summary_token must be one of {SUMMARY_TOKENS}, not {self.summary_token!r}")
        if self.heads < 1 or self.width % self.heads or self.hidden_size % self.heads:
            raise ValueError(
                f"{self.heads} heads must divide the width {self.width} and the hidden size {self.hidden_size}"
            )


@dataclass
class EditSignal:
    """One edit's signal: the edit sample's hidden states and the influence mapper's key: the last prompt
    token's row (d,), or with ``summary_token="image"`` the mean of the edit image's rows (1, d) (all the
    mapper reads of them; files that hold every row (N_v, d) are read as their mean)."""

    states: torch.Tensor  # (N_e, d)
    last: torch.Tensor  # (d,) or, with summary_token="image", (1, d)
    key: torch.Tensor | None = None  # (k,) the edit image's scope key (``scope.image_keys``), with a scope gate
    question: torch.Tensor | None = None  # (d,) the edit question's key (``scope.QuestionReader``), likewise


class SignalBatch:
    """Signals padded into one tensor: (E, N, d) states, (E, N) mask, (E, d) last rows."""

    def __init__(
        self, signals: Sequence[EditSignal], device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ):
        if not signals:
            raise ValueError("no edit signals")
        n = max(s.states.shape[0] for s in signals)
        d = signals[0].states.shape[1]
        self.states = torch.zeros(len(signals), n, d, dtype=dtype, device=device)
        self.mask = torch.zeros(len(signals), n, dtype=torch.bool, device=device)
        for i, s in enumerate(signals):
            self.states[i, : s.states.shape[0]] = s.states.to(device, dtype)
            self.mask[i, : s.states.shape[0]] = True
        self.last = torch.stack([s.last.to(device, dtype) for s in signals])

    def __len__(self) -> int:
        return self.states.shape[0]


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def unit_rms(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to unit root-mean-square per row (the adapter's inputs differ in scale by 100×)."""
    return x / rms(x)


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class VEAD(nn.Module):
    """The adapter's parameters and its two computations (cross-attention, influence mapper)."""

    def __init__(self, config: VEADConfig):
        super().__init__()
        d, a = config.hidden_size, config.width
        self.config = config
        self.w1 = nn.Linear(d, a)
        self.w2 = nn.Linear(d, a)
        self.w3 = nn.Linear(d, d)
        self.f1 = _mlp(2 * d if config.mapper_context else d, a)
        if config.mapper_tied:
            self.mapper_bias = nn.Parameter(torch.zeros(()))
        else:
            self.f2 = _mlp(d, a)
        last = self.w3
        if config.heads > 1:
            self.wo = nn.Linear(d, d)  # joins the heads' outputs
            last = self.wo
        nn.init.zeros_(last.weight)  # starts as the identity map: h + 0
        nn.init.zeros_(last.bias)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def context(x: torch.Tensor) -> torch.Tensor:
        """An image's visual states (..., n, d) summarised as their mean, scaled to unit RMS (..., d)."""
        return unit_rms(x.mean(-2))

    def prepare(self, signals: SignalBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-edit keys (E, N, d_a), values (E, N, d), key mask (E, N) and mapper queries (E, d_a)."""
        states = unit_rms(signals.states)
        key = self.context(signals.last) if self.config.summary_token == "image" else unit_rms(signals.last)
        query = self.f1(torch.cat([key, key], -1)) if self.config.mapper_tied else self.f2(key)
        return self.w2(states), self.w3(states), signals.mask, query

    def influence_logits(self, h: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """f1(h) · f2(h̄_last)ᵀ / √d_a: h (..., N_v, d), queries (..., d_a) → (..., N_v) (before the sigmoid)."""
        x = unit_rms(h)
        if self.config.mapper_context:
            x = torch.cat([x, self.context(h).unsqueeze(-2).expand_as(x)], -1)
        logits = (self.f1(x) * queries.unsqueeze(-2)).sum(-1) / math.sqrt(self.config.width)
        return logits + self.mapper_bias if self.config.mapper_tied else logits

    def cross_attention(
        self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """ḣ for rows h (..., N_v, d) against one signal per row: keys (..., N, d_a), values (..., N, d);
        in units of each visual state's RMS."""
        H = self.config.heads
        q = self.w1(unit_rms(h))
        if H == 1:
            scores = q @ keys.transpose(-1, -2) / math.sqrt(self.config.width)
            scores = scores.masked_fill(~mask.unsqueeze(-2), float("-inf"))
            return (torch.softmax(scores, dim=-1) @ values) * rms(h)

        def split(t: torch.Tensor) -> torch.Tensor:  # (..., n, d) -> (..., H, n, d/H)
            return t.unflatten(-1, (H, -1)).transpose(-2, -3)

        scores = split(q) @ split(keys).transpose(-1, -2) / math.sqrt(self.config.width // H)
        scores = scores.masked_fill(~mask.unsqueeze(-2).unsqueeze(-3), float("-inf"))
        out = (torch.softmax(scores, dim=-1) @ split(values)).transpose(-2, -3).flatten(-2)
        return self.wo(out) * rms(h)

    def paired(self, h: torch.Tensor, signals: SignalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Training form: row b of h (B, N_v, d) is edited by signal b. Returns (new h, influence logits)."""
        keys, values, mask, q = self.prepare(signals)
        logits = self.influence_logits(h, q)
        return h + self.cross_attention(h, keys, values, mask) * torch.sigmoid(logits).unsqueeze(-1), logits

    def all_edits(self, h: torch.Tensor, prepared, select: torch.Tensor | None = None) -> torch.Tensor:
        """Serving form: every row of h (B, N_v, d) gets Σ_e ḣ_e ⊙ C_e over all E live edits, or with
        ``select`` (B, E) over the edits selected for the row only."""
        keys, values, mask, q = prepared
        hv = h.unsqueeze(1)  # (B, 1, N_v, d)
        gate = torch.sigmoid(self.influence_logits(hv, q.unsqueeze(0)))  # (B, E, N_v)
        if select is not None:
            gate = gate * select.unsqueeze(-1).to(gate.dtype)
        dh = self.cross_attention(hv, keys.unsqueeze(0), values.unsqueeze(0), mask.unsqueeze(0))  # (B, E, N_v, d)
        return h + (dh * gate.unsqueeze(-1)).sum(1)


class VisualPositions:
    """Records, per forward pass of the base model, which positions hold image tokens (thread-scoped)."""

    def __init__(self, vlm: VLM):
        self.mask: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None
        self.image_id = vlm.image_token_id

    def hook(self, _mod, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.ids = ids
        self.mask = None if ids is None else ids == self.image_id


class AttachedVEAD:
    """VEAD on ``vlm`` at its layer. ``mode="all"``: every row gets every signal (serving);
    ``mode="paired"``: row b gets signal b (training), and the influence logits of the
    last pass are kept in ``self.logits`` ((B, N_v)) with the visual states in ``self.inputs``.

    With a ``gate`` (``mode="all"`` only: a callable from the image rows' visual states (B, N_v, d), token
    ids (B, T) and image ends (B,) to a (B, E) selection of the live edits; ``VisEditSet.attach`` passes its
    scope gate) a row gets only the edits selected for it, and a row with none, or a pass with none at all,
    is left exactly as it was.
    ``self.selected`` keeps the last image pass's selection.
    With ``rows`` (``vlm.hooks.Rows``) only those rows of a batch are edited; the others keep their states."""

    def __init__(
        self,
        vlm: VLM,
        vead: VEAD,
        signals: SignalBatch | Sequence[EditSignal],
        mode: str = "all",
        gate=None,
        rows: Rows | None = None,
    ):
        if mode not in ("all", "paired"):
            raise ValueError(f"mode must be 'all' or 'paired', not {mode!r}")
        if gate is not None and mode != "all":
            raise ValueError("a scope gate selects among live edits: it needs mode='all'")
        if rows is not None and mode != "all":
            raise ValueError("only the serving form (mode='all') edits some rows of a batch")
        self.vead, self.mode = vead, mode
        only = rows
        self.logits: torch.Tensor | None = None
        self.inputs: torch.Tensor | None = None
        self.selected: torch.Tensor | None = None
        self.positions = VisualPositions(vlm)
        device = vlm.input_device
        if gate is not None:  # the selected edits' signals are prepared when a row is in their scope
            if isinstance(signals, SignalBatch):
                raise ValueError("a scope gate selects among the edits' own signals: pass them as a list")
            listed = list(signals)
            signals_on, prepared = None, None
        else:
            signals_on = signals if isinstance(signals, SignalBatch) else SignalBatch(signals, device=device)
            prepared = None if mode == "paired" else vead.prepare(signals_on)

        def edit_group(h, mask, n_v: int, order):
            """The new visual states of the rows ``mask`` marks (each with ``n_v`` image tokens), as
            (positions mask, states); None where no row of the group is in any edit's scope."""
            rows = mask.any(1)
            x = h[mask].view(int(rows.sum()), n_v, h.shape[-1]).to(vead.w1.weight.dtype)
            if mode == "paired":
                new, self.logits = vead.paired(x, signals_on)
                self.inputs = x
                return mask, new
            if gate is None:
                return mask, vead.all_edits(x, prepared)
            image_rows = rows.nonzero().squeeze(1)
            ends = [int(m.nonzero().max()) + 1 for m in mask[image_rows]]
            select = gate(x, self.positions.ids[image_rows], ends)  # (rows, E)
            self.selected[order[image_rows]] = select
            hit = select.any(1)
            if not bool(hit.any()):
                return None
            used = select.any(0).nonzero().squeeze(1)  # only the edits some row is in the scope of
            part = vead.prepare(SignalBatch([listed[i] for i in used.tolist()], device=device, dtype=x.dtype))
            new = vead.all_edits(x[hit], part, select[hit][:, used])
            mask = mask.clone()
            mask[image_rows[~hit]] = False  # rows out of every scope keep their states
            return mask, new

        def pre(_mod, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            mask = self.positions.mask
            if mask is None or mask.shape != h.shape[:2]:
                return None  # a decoding step (no image tokens) or a pass without input ids
            if only is not None:  # the rows of the batch this attachment edits
                mask = mask & only.mask(mask.shape[0], mask.device).unsqueeze(1)
            if not bool(mask.any()):
                return None
            counts = mask.sum(1)
            rows = counts > 0  # text-only rows have nothing to change
            if mode == "paired" and not bool(rows.all()):
                raise ValueError("in the paired (training) form every row needs an image")
            sizes = counts[rows].unique().tolist()
            if mode == "paired" and len(sizes) > 1:
                raise ValueError("in the paired (training) form every row must hold the same number of image tokens")
            if gate is not None:
                self.selected = torch.zeros(int(rows.sum()), len(listed), dtype=torch.bool, device=h.device)
            changed, out = False, h
            order = rows.long().cumsum(0) - 1  # each batch row's index among the image rows
            # rows whose images have different token counts (a family that sizes images dynamically) are
            # edited in groups of one count: every VEAD operation is per visual token, the scope key per row
            for n_v in sizes:
                group = mask & (counts == n_v).unsqueeze(1)
                new = edit_group(h, group, int(n_v), order)
                if new is None:
                    continue
                if not changed:
                    out, changed = h.clone(), True
                out[new[0]] = new[1].to(h.dtype).reshape(-1, h.shape[-1])
            if not changed:
                return None  # no row is in any edit's scope: the base model, bit for bit
            h = out
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = h
                return args, kwargs
            return (h,) + tuple(args[1:]), kwargs

        self._hooks = Hooks()
        with self._hooks.installing():
            base = vlm.module(vlm.arch.base_model)
            self._hooks.add(base, self.positions.hook, pre=True, with_kwargs=True)
            self._hooks.add(vlm.module(vlm.arch.layer_path(vead.config.layer)), pre, pre=True, with_kwargs=True)

    def remove(self) -> None:
        self._hooks.remove()

    def __enter__(self) -> AttachedVEAD:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
