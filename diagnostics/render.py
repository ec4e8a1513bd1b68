"""PNG figures of the diagnostics, in the style of ROME, Basu et al. and VisEdit.

* ``render_trace``: a causal trace (``TraceResult``): one heatmap per state
  kind (hidden / MLP / attention), rows are prompt tokens, columns are
  layers, colour is the indirect effect; constraint rows are starred.
* ``render_matrix``: any rows x columns heatmap (e.g. attention
  contributions or knockout drops per token and layer).
* ``render_curves``: lines over layers, optionally with +/- standard-error bands.
* ``render_bars``: grouped bars (e.g. attention vs MLP per layer).
* ``render_image_maps``: per-patch scores overlaid on the image, one panel each.
* ``render_overlays``: per-patch scores over several images on one absolute scale.
* ``render_roc``: ROC curves with their AUROC.

Every function takes the output ``path``, creates its folder, writes the
figure atomically (temporary file in the same folder, then ``os.replace``)
at 150 dpi and returns the ``Path`` written. Bad shapes raise ``ValueError``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from .trace import NEGLIGIBLE_EFFECT

PathLike = str | os.PathLike[str]

_DPI = 150
_MAX_TICKS = 40
_IMAGE_SIDE = 224
_MAPS_PER_ROW = 6
_TRACE_STYLE = {  # kind -> (colormap, panel title), as in ROME
    "hidden": ("Purples", "hidden states"),
    "mlp": ("Greens", "MLP output"),
    "attn": ("Reds", "attention output"),
}


def _save(fig: Figure, path: PathLike) -> Path:
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=_DPI, bbox_inches="tight")
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return out


def _matrix(values: Any, n_rows: int, what: str) -> np.ndarray:
    m = np.asarray(values, dtype=float)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"{what} must be a non-empty rows x columns matrix, got shape {m.shape}")
    if m.shape[0] != n_rows:
        raise ValueError(f"{what} has {m.shape[0]} rows but there are {n_rows} row labels")
    return m


def _column_ticks(ax: Axes, labels: Sequence[str]) -> None:
    step = 1 if len(labels) <= _MAX_TICKS else math.ceil(len(labels) / _MAX_TICKS)
    ticks = list(range(0, len(labels), step))
    rotate = len(ticks) > 20 or any(len(labels[i]) > 3 for i in ticks)
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90 if rotate else 0, fontsize=7)


def _row_ticks(ax: Axes, labels: Sequence[str], marked: Collection[int]) -> None:
    ax.set_yticks(range(len(labels)), [f"{s}*" if i in marked else s for i, s in enumerate(labels)], fontsize=8)
    for i, tick in enumerate(ax.get_yticklabels()):
        if i in marked:
            tick.set_fontweight("bold")


def render_trace(result: Any, path: PathLike) -> Path:
    """Heatmaps of a causal trace: one panel per kind, rows = tokens, columns = layers."""
    labels = [row.label for row in result.rows]
    marked = {i for i, row in enumerate(result.rows) if row.constraint}
    if not result.kinds:
        raise ValueError("trace has no kinds to render")
    mats = {}
    for kind in result.kinds:
        if kind not in _TRACE_STYLE:
            raise ValueError(f"unknown trace kind {kind!r}; expected one of {sorted(_TRACE_STYLE)}")
        if kind not in result.effects:
            raise ValueError(f"trace has no effects for kind {kind!r}")
        mats[kind] = _matrix(result.effects[kind], len(labels), f"effects[{kind!r}]")
    n_layers = {m.shape[1] for m in mats.values()}
    if len(n_layers) != 1:
        raise ValueError(f"trace kinds disagree on the number of layers: {sorted(n_layers)}")
    width = 0.13 * n_layers.pop() + 2.5
    fig, axes = plt.subplots(
        1,
        len(mats),
        sharey=True,
        squeeze=False,
        layout="constrained",
        figsize=(width * len(mats), 0.3 * len(labels) + 1.8),
    )
    for ax, (kind, m) in zip(axes[0], mats.items()):
        cmap, name = _TRACE_STYLE[kind]
        im = ax.imshow(
            m,
            cmap=cmap,
            vmin=min(0.0, float(m.min())),
            vmax=max(float(m.max()), NEGLIGIBLE_EFFECT),  # noise below it stays pale instead of a "peak"
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_title(f"{name}, window {result.window}", fontsize=10)
        ax.set_xlabel("layer")
        _column_ticks(ax, [str(i) for i in range(m.shape[1])])
        fig.colorbar(im, ax=ax, label="indirect effect")
    _row_ticks(axes[0][0], labels, marked)
    head = f"{result.method}: {result.label}" if result.label else result.method
    if result.cases > 1 and "cases" not in head:
        head += f" ({result.cases} cases)"
    probs = f"P_clean={result.p_clean:.3f}  P_corrupt={result.p_corrupt:.3f}"
    if result.answer:
        probs += f"  answer {result.answer!r}"
    if result.replacement:
        probs += f"  replacement {result.replacement!r}"
    if not result.localises:
        probs += f"\nlocalises nothing: largest effect {result.largest_effect:.1e} < {NEGLIGIBLE_EFFECT}"
    fig.suptitle(f"{head}\n{probs}", fontsize=10)
    return _save(fig, path)


def render_matrix(
    values: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: PathLike,
    title: str = "",
    colorbar_label: str = "",
    marked_rows: Collection[int] = (),
    cmap: str = "Blues",
) -> Path:
    """Heatmap of a rows x columns matrix; ``marked_rows`` get bold, starred labels."""
    m = _matrix(values, len(row_labels), "values")
    if m.shape[1] != len(col_labels):
        raise ValueError(f"values has {m.shape[1]} columns but there are {len(col_labels)} column labels")
    fig, ax = plt.subplots(layout="constrained", figsize=(0.16 * m.shape[1] + 3.0, 0.3 * m.shape[0] + 1.5))
    im = ax.imshow(m, cmap=cmap, aspect="auto", interpolation="nearest")
    _row_ticks(ax, [str(s) for s in row_labels], set(marked_rows))
    _column_ticks(ax, [str(s) for s in col_labels])
    fig.colorbar(im, ax=ax, label=colorbar_label)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def render_curves(
    series: Mapping[str, Sequence[float]],
    path: PathLike,
    title: str = "",
    xlabel: str = "layer",
    ylabel: str = "",
    x: Sequence[float] | None = None,
    hline: float | None = None,
    bands: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """One line per series (with markers); ``bands`` adds a +/- band for the keys it has."""
    if not series:
        raise ValueError("render_curves needs at least one series")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for name, ys in series.items():
        y = np.asarray(ys, dtype=float)
        xs = np.arange(len(y)) if x is None else np.asarray(x, dtype=float)
        if y.ndim != 1 or len(xs) != len(y):
            raise ValueError(f"series {name!r} has {y.size} values but x has {len(xs)}")
        (line,) = ax.plot(xs, y, marker="o", markersize=3, label=name)
        if bands and name in bands:
            err = np.asarray(bands[name], dtype=float)
            if err.shape != y.shape:
                raise ValueError(f"band {name!r} has {err.size} values but its series has {y.size}")
            ax.fill_between(xs, y - err, y + err, color=line.get_color(), alpha=0.2, linewidth=0)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    return _save(fig, path)


def render_bars(
    groups: Mapping[str, Sequence[float]], labels: Sequence[str], path: PathLike, title: str = "", ylabel: str = ""
) -> Path:
    """Grouped bar chart: one bar per group within each category of ``labels``."""
    if not groups or not labels:
        raise ValueError("render_bars needs at least one group and one label")
    width = 0.8 / len(groups)
    centres = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.25 * len(labels) * len(groups) + 1.5), 4.0), layout="constrained")
    for k, (name, ys) in enumerate(groups.items()):
        if len(ys) != len(labels):
            raise ValueError(f"group {name!r} has {len(ys)} values but there are {len(labels)} labels")
        ax.bar(centres + (k - (len(groups) - 1) / 2) * width, ys, width, label=name)
    ax.axhline(0, color="black", linewidth=0.6)
    _column_ticks(ax, [str(s) for s in labels])
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=8)
    return _save(fig, path)


def render_image_maps(
    image: Image.Image,
    maps: Sequence[Sequence[float]],
    titles: Sequence[str],
    path: PathLike,
    grid: tuple[int, int],
    title: str = "",
    alpha: float = 0.55,
) -> Path:
    """Patch scores (row-major, ``grid`` = (rows, cols)) overlaid on the image, one panel each."""
    rows, cols = grid
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid must be two positive ints, got {grid}")
    if not maps or len(maps) != len(titles):
        raise ValueError(f"need one title per map and at least one map, got {len(maps)} maps, {len(titles)} titles")
    small = min(image.size) < _IMAGE_SIDE
    picture = image.convert("RGB").resize(
        (_IMAGE_SIDE, _IMAGE_SIDE), Image.Resampling.NEAREST if small else Image.Resampling.BICUBIC
    )
    per_row = min(len(maps), _MAPS_PER_ROW)
    n_lines = math.ceil(len(maps) / per_row)
    fig, axes = plt.subplots(
        n_lines,
        per_row,
        squeeze=False,
        layout="constrained",
        figsize=(2.3 * per_row + 0.8, 2.5 * n_lines + (0.4 if title else 0)),
    )
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if i >= len(maps):
            continue
        scores = np.asarray(maps[i], dtype=float)
        if scores.size != rows * cols:
            raise ValueError(f"map {i} has {scores.size} scores but grid {grid} has {rows * cols} patches")
        low, high = float(scores.min()), float(scores.max())
        norm = (scores - low) / (high - low) if high > low else np.zeros_like(scores)
        ax.imshow(picture)
        ax.imshow(
            norm.reshape(rows, cols),
            cmap="jet",
            alpha=alpha,
            vmin=0.0,
            vmax=1.0,
            extent=(0, _IMAGE_SIDE, _IMAGE_SIDE, 0),
            interpolation="nearest",
        )
        ax.set_title(titles[i], fontsize=9)
    fig.colorbar(
        ScalarMappable(Normalize(0.0, 1.0), "jet"), ax=axes.ravel().tolist(), label="normalised score", shrink=0.8
    )
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def render_overlays(
    images: Sequence[Image.Image],
    maps: Sequence[Sequence[float]],
    titles: Sequence[str],
    path: PathLike,
    grid: tuple[int, int],
    title: str = "",
    colorbar_label: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
    alpha: float = 0.55,
) -> Path:
    """One panel per (image, patch scores) pair on one absolute colour scale [vmin, vmax]
    (e.g. VisEdit's influence mapper over the edit image and an unrelated one)."""
    rows, cols = grid
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid must be two positive ints, got {grid}")
    if not maps or not (len(maps) == len(titles) == len(images)):
        raise ValueError(
            f"need one image and one title per map, got {len(images)} images, {len(maps)} maps, {len(titles)} titles"
        )
    fig, axes = plt.subplots(
        1, len(maps), squeeze=False, layout="constrained", figsize=(2.4 * len(maps) + 0.9, 2.7 + (0.4 if title else 0))
    )
    for ax, image, scores, t in zip(axes.ravel(), images, maps, titles):
        scores = np.asarray(scores, dtype=float)
        if scores.size != rows * cols:
            raise ValueError(f"a map has {scores.size} scores but grid {grid} has {rows * cols} patches")
        picture = image.convert("RGB").resize((_IMAGE_SIDE, _IMAGE_SIDE), Image.Resampling.BICUBIC)
        ax.set_axis_off()
        ax.imshow(picture)
        ax.imshow(
            scores.reshape(rows, cols),
            cmap="jet",
            alpha=alpha,
            vmin=vmin,
            vmax=vmax,
            extent=(0, _IMAGE_SIDE, _IMAGE_SIDE, 0),
            interpolation="nearest",
        )
        ax.set_title(t, fontsize=8)
    fig.colorbar(
        ScalarMappable(Normalize(vmin, vmax), "jet"), ax=axes.ravel().tolist(), label=colorbar_label, shrink=0.8
    )
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def render_roc(
    scores: Mapping[str, tuple[Sequence[float], Sequence[float], float]], path: PathLike, title: str = ""
) -> Path:
    """ROC curves, one per name, with the chance diagonal dashed."""
    if not scores:
        raise ValueError("render_roc needs at least one curve")
    fig, ax = plt.subplots(figsize=(4.8, 4.6), layout="constrained")
    for name, (fpr, tpr, auroc) in scores.items():
        if len(fpr) != len(tpr):
            raise ValueError(f"ROC {name!r} has {len(fpr)} false-positive rates but {len(tpr)} true-positive rates")
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set(
        title=title,
        xlabel="false positive rate",
        ylabel="true positive rate",
        xlim=(0, 1),
        ylim=(0, 1.01),
        aspect="equal",
    )
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)
