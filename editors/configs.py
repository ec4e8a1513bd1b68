"""The editors' configurations: every setting with its default and help (``vlm.options.option``).

They live apart from the editors so that the CLI can build its ``--flags`` from them without importing
torch (``editlens --help`` and the remote commands stay fast); each editor module imports its own from
here. A configuration's ``check(vlm)`` says what is wrong with a value (``ConfigError``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from vlm.options import ConfigError, option

if TYPE_CHECKING:
    from vlm.loading import VLM

LOSSES = ("rel", "gen", "loc", "im_up", "im_down", "im_attr")
SCOPES = ("key", "fact", "subject")  # KeyGate: what an edit of a known fact claims


class TrainError(ConfigError):
    """Training cannot start or go on (a bad setting, an unreadable checkpoint, no training cases)."""


def check_key_and_value(config: Any, vlm: VLM) -> None:
    """The checks of the settings MultEdit, AlphaEdit and KeyGate share (layer, value optimisation, subjects)."""
    if config.layer != "auto" and (not isinstance(config.layer, int) or not 0 <= config.layer < vlm.num_layers):
        raise ConfigError(f"layer {config.layer!r} is outside 0..{vlm.num_layers - 1} (or use 'auto')")
    if config.steps < 0 or config.lr <= 0:
        raise ConfigError("steps must be >= 0 and lr > 0")
    if config.lr_scale not in ("none", "residual"):
        raise ConfigError(f"lr_scale must be 'none' or 'residual', not {config.lr_scale!r}")
    if config.max_norm is not None and config.max_norm <= 0:
        raise ConfigError("max_norm must be positive")
    if not 0 < config.target_prob <= 1:
        raise ConfigError("target_prob must be in (0, 1]")
    if not -1 <= config.same_subject_cos <= 1:
        raise ConfigError("same_subject_cos must be a cosine in [-1, 1]")


@dataclass
class MultEditConfig:
    """MultEdit's settings; each field's default and help are what the CLI and the server offer."""

    layer: int | str = option(
        "auto",
        "Decoder layer whose MLP down projection is edited, or auto: the peak early MLP indirect effect of the "
        "causal trace over the request and its variants (the evidence is stored with the edit).",
    )
    lam: float = option(0.01, "Ridge λ of the closed form (paper: 0.01).", flag="--lambda")
    steps: int = option(100, "Adam steps of the value optimisation, at most.")
    lr: float = option(0.1, "Adam learning rate of the value (paper: 0.1).")
    lr_scale: str = option(
        "residual",
        "residual: lr is in units of the residual stream's RMS at the key (works across model scales); "
        "none: absolute, as the paper.",
    )
    max_norm: float | None = option(None, "Bound on the value change ‖δ‖ (default: none).")
    target_prob: float = option(0.95, "Stop the value optimisation once P(new answer) reaches this, every token top-1.")
    same_subject_cos: float = option(
        0.9, "Joint edits: keys at least this similar (cosine) are one subject and share one value."
    )
    keep_earlier: bool = option(True, "Sequential edits: the earlier edits' keys (other subjects) keep their outputs.")

    def check(self, vlm: VLM) -> None:
        check_key_and_value(self, vlm)
        if self.lam <= 0:
            raise ConfigError("λ must be positive")


@dataclass
class KeyGateConfig:
    """KeyGate's settings: MultEdit's key and value, and the gate's (``editors.keygate``)."""

    layer: int | str = option(
        "auto",
        "Decoder layer whose MLP down projection holds the gate, or auto: chosen as MultEdit chooses it.",
    )
    steps: int = option(100, "Adam steps of the value optimisation, at most.")
    lr: float = option(0.1, "Adam learning rate of the value (paper: 0.1).")
    lr_scale: str = option(
        "residual", "residual: lr in units of the residual stream's RMS at the key; none: absolute, as the paper."
    )
    max_norm: float | None = option(None, "Bound on the value change ‖δ‖ (default: none).")
    target_prob: float = option(0.95, "Stop the value optimisation once P(new answer) reaches this, every token top-1.")
    threshold: float = option(
        0.8,
        "The gate opens at a token whose key is nearest to an edit's key (centred cosine) and at least this close.",
    )
    same_subject_cos: float = option(
        0.999,
        "An edit whose key is at least this close to an earlier edit's key (the same subject asked the same way) "
        "writes into that edit's entry.",
    )
    scope: str = option(
        "key",
        "What an edit of a fact the model knows takes over (its key within same_subject_cos of the statistics' "
        "key of a known prompt): key (only such keys), fact (every rendering and wording of that fact), or "
        "subject (every question about that subject).",
    )
    guard: bool = option(
        True,
        "The model's own keys (the preservation statistics' reference keys) compete with the edits' keys: the "
        "gate stays closed where a known subject's key is nearer than any edit's.",
    )
    variants: bool = option(
        True,
        "Key the edit also by the variants its request supplies (the rephrase on the image, the question on the "
        "image rephrase, both), the value optimised on all of them: the edit answers every image and wording "
        "given with it. Off: only the edit's own prompt.",
    )

    def check(self, vlm: VLM) -> None:
        check_key_and_value(self, vlm)
        if not -1 <= self.threshold <= 1:
            raise ConfigError("threshold must be a cosine in [-1, 1]")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, not {self.scope!r}")


@dataclass
class AlphaEditConfig(MultEditConfig):
    """AlphaEdit (Fang et al., ICLR 2025) on MultEdit's key and value: the update is projected onto the null
    space of the preservation statistics C₀ and keeps every earlier edit's key (``editors.alphaedit``)."""

    lam: float = option(1.0, "Ridge λ of the projected closed form (AlphaEdit: 1).", flag="--lambda")
    null_threshold: float = option(
        2e-2,
        "Directions whose eigenvalue of C₀ is below this form the null space the update lives in (AlphaEdit: 2e-2).",
    )

    def check(self, vlm: VLM) -> None:
        super().check(vlm)
        if self.null_threshold <= 0:
            raise ConfigError("null_threshold must be positive")


@dataclass
class FineTuneConfig:
    """FT-L's settings (defaults and help shared by the CLI and the server)."""

    layer: int = option(0, "Decoder layer whose MLP down projection is fine-tuned.")
    steps: int = option(100, "Adam steps, at most.")
    lr: float = option(1e-3, "Adam learning rate.")
    max_change: float | None = option(None, "L∞ bound on the entries of ΔW (default: none).")
    target_prob: float = option(0.95, "Stop once P(new answer) reaches this, every token top-1.")

    def check(self, vlm: VLM) -> None:
        if not 0 <= self.layer < vlm.num_layers:
            raise ConfigError(f"layer {self.layer} is outside 0..{vlm.num_layers - 1}")
        if self.steps < 0 or self.lr <= 0:
            raise ConfigError("steps must be >= 0 and lr > 0")
        if self.max_change is not None and self.max_change <= 0:
            raise ConfigError("max_change must be positive")


@dataclass
class VisEditConfig:
    """Which trained VisEdit adapter edits: a file, or (on a server) a registry version that holds one."""

    adapter: str = option("", "A trained adapter file (the adapter.safetensors of `editlens visedit train`).")
    editor_adapter: str = option(
        "", "On a server: the adapter (lineage) whose version holds the trained VisEdit editor."
    )
    editor_version: int = option(0, "On a server: that version (0: its live version).")

    def check(self, vlm: VLM | None = None) -> None:
        if not self.adapter and not self.editor_adapter:
            raise ConfigError(
                "a VisEdit edit needs a trained VisEdit editor: an adapter file (`editlens visedit train`), or on a "
                "server the adapter whose version holds one (visedit.editor_adapter; TrainVisEdit makes one)"
            )
        if self.editor_version < 0:
            raise ConfigError("editor_version is a version number (>= 1), or 0 for the live version")


@dataclass
class VisEditTrainConfig:
    """The trainer's settings; defaults and help are what `editlens visedit train` and TrainVisEdit offer."""

    layer: int | str = option(
        "auto",
        "VEAD layer: the adapter changes the visual states at the input of this decoder layer; or auto: "
        "the VEAD recommendation (module attribution and image read-out).",
    )
    signal_layer: int | str = option("auto", "Layer at whose input the edit signal is read, or auto: the VEAD layer.")
    summary_layer: int | str | None = option(None, "Where the mapper's key is read (default: the signal layer).")
    summary_token: str = option(
        "image", "The influence mapper's key: the last prompt token (paper), the constraint, or the edit image."
    )
    mapper_context: bool = option(True, "f1 also sees the image's mean visual state (paper: each state alone).")
    mapper_tied: bool = option(
        True,
        "One MLP on both sides of the influence mapper: C compares the input image with the edit image "
        "(paper: f1 and f2 separate).",
    )
    attribution_layers: list[int] | str = option(
        "auto", "L_h for the attribution loss; auto: the high-contribution block."
    )
    width: int = option(128, "The adapter's width d_a (paper: 1024 on 7B models).")
    heads: int = option(4, "Cross-attention heads (paper: 1; one head did not train here).")
    steps: int = option(3000, "Training steps.")
    batch_size: int = option(8, "Edit samples per step.")
    lr: float = option(1e-2, "Adam learning rate (paper: 1e-4 at batch 4 for 200K steps).")
    seed: int = option(0, "Seed of the sampling and the initialisation.")
    per_entity: int = option(60, "Drawn training edits per training entity.")
    synthetic: int = option(
        1500, "Extra training edits about synthetic entities drawn for the occasion (never the test entities' looks)."
    )
    synthetic_locality: bool = option(
        True, "Half of the synthetic edits' unrelated images show another synthetic entity (else a world entity)."
    )
    validation_fraction: float = option(0.2, "Share of the training entities held out for validation.")
    validation_samples: int = option(48, "Validation edits scored at every validation.")
    eval_every: int = option(250, "Validate (and keep the best adapter) every N steps.")
    checkpoint_every: int = option(250, "Write a resumable checkpoint every N steps.")
    im_tokens: int = option(8, "Visual tokens sampled per row for the influence-mapper losses (|N_s|).")
    weights: dict[str, float] = option(
        help="Weight of each loss (default 1 each, the paper's).", factory=lambda: dict.fromkeys(LOSSES, 1.0)
    )
    recommend_cases: int = option(8, "Training cases the auto layers are chosen on.")
    signal_rows: str = option(
        "all", "What an edit's signal keeps: all rows of the edit sample (paper), or text (not the image's rows)."
    )
    scope_far: float = option(
        1e-3,
        "Calibrate the adapter's scope gate to this false-accept rate on unrelated images after training "
        "(0: no gate, the paper's form where every edit reaches every image through its influence map).",
    )

    def check(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "width",
            "eval_every",
            "checkpoint_every",
            "im_tokens",
            "validation_samples",
            "recommend_cases",
        ):
            if int(getattr(self, name)) < 1:
                raise TrainError(f"{name} must be at least 1")
        if self.heads < 1 or self.width % self.heads:
            raise TrainError(f"{self.heads} heads must divide the width {self.width}")
        if self.lr <= 0:
            raise TrainError("lr must be positive")
        if self.signal_rows not in ("all", "text"):
            raise TrainError(f"signal_rows must be all or text, not {self.signal_rows!r}")
        if not 0 <= self.scope_far < 1:
            raise TrainError("scope_far is a false-accept rate in [0, 1) (0: no scope gate)")
        if self.mapper_tied and not (self.mapper_context and self.summary_token == "image"):
            raise TrainError(
                "the tied influence mapper compares images: it needs summary_token='image' and "
                "mapper_context; set mapper_tied=False (--no-mapper-tied) for the paper's form"
            )
        unknown = set(self.weights) - set(LOSSES)
        if unknown:
            raise TrainError(f"unknown loss weight(s) {sorted(unknown)}; the losses are {LOSSES}")
        for name in ("layer", "signal_layer"):
            v = getattr(self, name)
            if v != "auto" and not isinstance(v, int):
                raise TrainError(f"{name} must be a layer number or 'auto', not {v!r}")

    def resolved_key(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed."""
        d = asdict(self)
        d.pop("steps")
        d.pop("eval_every")
        d.pop("checkpoint_every")
        d.pop("scope_far")  # the gate is calibrated after training: it does not change the steps
        return d
