"""Attributions of VisEdit (Chen et al. §3): which modules and which visual states matter.

Module-output attribution (eq. 3–5). The last position's residual stream is
h_N^L = h_N^0 + Σ_ℓ (a_N^ℓ + m_N^ℓ), so each attention output a and MLP output
m can be read through the unembedding W_V (as the paper writes it, without
the final norm). For the key token o* (O's first token):

    C^p(r) = softmax(r W_V)[o*]
    C^v(r) = (r W_V)[o*] / max_ℓ max(|a_N^ℓ W_V[o*]|, |m_N^ℓ W_V[o*]|)
    C(r)   = sqrt(C^p(r) · C^v(r))      (0 where C^v < 0: the module argues against o*)

Visual-representation attribution (eq. 6–8). At layer ℓ each visual state
h_n^{ℓ−1} (the input of layer ℓ; the embeddings for ℓ = 0) in turn gets noise
ε ~ N(0, (3σ)²), σ the standard deviation of the visual states there; the
contribution is (1 − cos(ã_N^ℓ, a_N^ℓ)) / 2 of the last position's attention
output at ℓ, averaged over ``samples`` draws (fixed seed). Shown as a
heatmap over the image's patch grid per layer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from vlm.loading import VLM
from vlm.patching import Patch, run_patched
from vlm.prompts import collate

from .cases import DiagnosticCase, Prepared, prepare
from .engine import MODES, Cell, CellRunner, Progress
from .errors import DiagnosticError


@dataclass
class ModuleAttribution:
    attention: list[float]  # C(a_N^ℓ) per layer
    mlp: list[float]  # C(m_N^ℓ) per layer
    answer: str
    question: str
    label: str = ""
    cases: int = 1
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VisualAttribution:
    layers: list[int]
    maps: list[list[float]]  # per layer: one score per visual token (row-major patch grid)
    grid: tuple[int, int]
    samples: int
    noise_scale: float
    seed: int
    answer: str
    question: str
    image: str | None = None  # path of the image (for overlays)
    label: str = ""
    cases: int = 1
    cells: int = 0
    forward_passes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _contribution(vecs: torch.Tensor, lm_head: torch.nn.Module, target: int, norm: float) -> torch.Tensor:
    logits = lm_head(vecs.to(lm_head.weight.dtype)).float()
    cp = torch.softmax(logits, dim=-1)[:, target]
    cv = logits[:, target] / norm
    return torch.sqrt(torch.clamp(cp * cv, min=0.0))


def module_attribution(vlm: VLM, case: DiagnosticCase | Prepared, mode: str = "batched") -> ModuleAttribution:
    """C of every layer's attention and MLP output at the last prompt position (one clean pass)."""
    t0 = time.perf_counter()
    if mode not in MODES:
        raise DiagnosticError(f"engine mode must be one of {MODES}, not {mode!r}")
    prep = case if isinstance(case, Prepared) else prepare(vlm, case)
    L, last = vlm.num_layers, prep.last
    inputs = collate([prep.prompt], vlm.tokenizer.pad_token_id)
    lm_head = vlm.arch.get(vlm.model, vlm.arch.lm_head)
    keys = [(k, l) for k in ("attn", "mlp") for l in range(L)]
    with torch.no_grad():
        if mode != "naive":
            run = run_patched(vlm, inputs, capture=keys)
            vecs = torch.stack([run.captured[key][0, last] for key in keys])
        else:  # naive: one forward pass per (module, layer)
            vecs = torch.stack([run_patched(vlm, inputs, capture=[key]).captured[key][0, last] for key in keys])
        logit = lm_head(vecs.to(lm_head.weight.dtype)).float()[:, prep.target_id]
        c = _contribution(vecs, lm_head, prep.target_id, float(logit.abs().max()))
    return ModuleAttribution(
        attention=c[:L].tolist(),
        mlp=c[L:].tolist(),
        answer=prep.target_token,
        question=prep.case.question,
        label=prep.case.label,
        seconds=time.perf_counter() - t0,
    )


def average_modules(results: Sequence[ModuleAttribution]) -> ModuleAttribution:
    """The mean of several cases' module attributions."""
    if not results:
        raise DiagnosticError("nothing to average")
    n = len(results)
    L = len(results[0].attention)
    return ModuleAttribution(
        attention=[sum(r.attention[l] for r in results) / n for l in range(L)],
        mlp=[sum(r.mlp[l] for r in results) / n for l in range(L)],
        answer="",
        question="",
        label=f"mean of {n} cases",
        cases=n,
        seconds=sum(r.seconds for r in results),
    )


def visual_attribution(
    vlm: VLM,
    case: DiagnosticCase | Prepared,
    layers: Sequence[int] | None = None,
    samples: int = 3,
    noise_scale: float = 3.0,
    seed: int = 0,
    mode: str = "batched",
    batch_size: int = 128,
    progress: Progress | None = None,
) -> VisualAttribution:
    """Visual-representation attribution (VisEdit eq. 6-8): per layer and visual token, (1 - cos) of the last
    position's attention output when that token's state is noised."""
    t0 = time.perf_counter()
    L = vlm.num_layers
    layers = list(range(L)) if layers is None else list(dict.fromkeys(layers))
    bad = [l for l in layers if not 0 <= l < L]
    if bad or not layers:
        raise DiagnosticError(f"layers {bad or layers} outside 0..{L - 1}")
    if samples < 1 or noise_scale <= 0:
        raise DiagnosticError("visual attribution needs samples ≥ 1 and a positive noise scale")
    prep = case if isinstance(case, Prepared) else prepare(vlm, case)
    p, last = prep.prompt, prep.last
    img = p.image_positions
    inputs = collate([p], vlm.tokenizer.pad_token_id)
    caps = [("embeds", -1)] + [("hidden", l - 1) for l in layers if l > 0] + [("attn", l) for l in layers]
    clean = run_patched(vlm, inputs, capture=caps).captured
    g = torch.Generator().manual_seed(seed)
    cells, index = [], []
    for l in layers:
        states = clean[("embeds", -1) if l == 0 else ("hidden", l - 1)][0, img].float()
        std = float(states.std()) * noise_scale
        kind, at = ("embeds", []) if l == 0 else ("hidden", [l - 1])
        for n, pos in enumerate(img):
            for _s in range(samples):
                eps = (torch.randn(1, states.shape[1], generator=g) * std).to(states.dtype)
                cells.append(Cell(patches=[Patch(0, kind, [pos], eps, at, mode="add")], read=("attn", l, last)))
                index.append((l, n))
    runner = CellRunner(vlm, p, None, mode=mode, batch_size=batch_size)
    res = runner.run(cells, progress)
    maps = {l: torch.zeros(len(img)) for l in layers}
    for (l, n), a_tilde in zip(index, res.reads):
        a = clean[("attn", l)][0, last].float()
        cos = torch.nn.functional.cosine_similarity(a_tilde.float(), a, dim=0)
        maps[l][n] += float((1 - cos) / 2) / samples
    return VisualAttribution(
        layers=layers,
        maps=[maps[l].tolist() for l in layers],
        grid=p.image_grid,
        samples=samples,
        noise_scale=noise_scale,
        seed=seed,
        answer=prep.target_token,
        question=p.question,
        image=str(prep.case.image) if prep.case.image is not None else None,
        label=prep.case.label,
        cells=len(cells),
        forward_passes=res.forward_passes,
        seconds=time.perf_counter() - t0,
    )


def average_visual(results: Sequence[VisualAttribution]) -> VisualAttribution:
    """The mean of several cases' visual attributions."""
    if not results:
        raise DiagnosticError("nothing to average")
    n = len(results)
    first = results[0]
    if any(r.grid != first.grid or r.layers != first.layers for r in results):
        raise DiagnosticError(
            "the cases' images have different token grids (or the runs different layers): average visual "
            "attributions of images of one size only"
        )
    maps = torch.stack([torch.tensor(r.maps) for r in results]).mean(0)
    return VisualAttribution(
        layers=first.layers,
        maps=maps.tolist(),
        grid=first.grid,
        samples=first.samples,
        noise_scale=first.noise_scale,
        seed=first.seed,
        answer="",
        question="",
        image=None,
        label=f"mean of {n} cases",
        cases=n,
        cells=sum(r.cells for r in results),
        forward_passes=sum(r.forward_passes for r in results),
        seconds=sum(r.seconds for r in results),
    )
