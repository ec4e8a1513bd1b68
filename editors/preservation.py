"""Preservation statistics: what the keys of one MLP look like on the model's own prompts.

For the ``down_proj`` of a layer ℓ, the keys are its inputs k ∈ R^{d_ff} at
every token. The statistics of a (base model, layer) pair are

* ``count``   the number of tokens they were taken from,
* ``mean``    μ = E[k] (d_ff),
* ``second``  C₀ = E[k kᵀ] (d_ff × d_ff), MEMIT's and AlphaEdit's statistic,
* ``reference`` the keys at the visual constraint's last token of the prompts
  that have one (labelled with the fact they ask, subject and relation, where
  the prompt file names them), and every 4th other token, image tokens included, less
  near-duplicates (R × d_ff): what the model's known subjects, and its
  ordinary tokens, look like there,

accumulated in float64 over every non-padding token (image tokens included)
of a set of prompts: for the embedded world its training questions, for any
other checkpoint a question file of the same shape. Lifelong editors read
them: AlphaEdit projects its updates onto the null space of C₀, the key gate
centres its keys on μ so that its cosine compares what distinguishes a key.

They are computed once per (base model, layer) and stored **beside the model**
(``<model>/editlens-statistics/layer-<ℓ>.safetensors``; the model's
fingerprint reads only its top-level files, so this does not change it): the
statistics belong to the base model, not to an adapter lineage, so every
version of every lineage and every replica that loads the same model folder
uses the same file. Where the model folder is read-only they go to
``$EDITLENS_HOME/statistics/<fingerprint>/``. The file records the model's
fingerprint and the prompts' digest; a file made for another model is refused.
Every edit made with them records their ``digest``.

Size: C₀ is d_ff² floats (float32 on disk): 1 MiB at d_ff = 512, 462 MiB at
d_ff = 11008 (LLaVA-1.5-7B), per edited layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlm.home import statistics_dir
from vlm.images import ProcessedImage, load_image, process_image
from vlm.loading import VLM
from vlm.patching import run_patched
from vlm.prompts import EncodedPrompt, collate, encode
from vlm.world.folder import WorldFolder

from .files import EditSetError, check_tensor, read_manifest, read_safetensors, write_safetensors

FORMAT = "editlens.preservation_statistics"
FORMAT_VERSION = 1
FOLDER = "editlens-statistics"
OTHER_TOKEN_STRIDE = 4  # reference keys: every 4th token besides the constraint's
REFERENCE_DISTINCT = 0.99  # reference keys closer than this (centred cosine) to a kept one are left out
DEFAULT_PROMPTS = 5000  # questions sampled from the prompt file (the world's 4,560 training questions: all)


class StatisticsError(EditSetError):
    """Preservation statistics cannot be read or made (no prompts, a file for another model...)."""


@dataclass
class PreservationStats:
    """μ and C₀ of the ``down_proj`` inputs of one layer of one base model."""

    layer: int
    count: int
    mean: torch.Tensor  # (d_ff,) float64
    second: torch.Tensor  # (d_ff, d_ff) float64
    reference: torch.Tensor  # (R, d_ff) float32: keys at the visual constraint of the prompts that have one
    reference_subject: torch.Tensor  # (R,) int64: the subject (index into ``subjects``) of a constraint key, or -1
    subjects: list[str]
    base_fingerprint: str
    source: dict[str, Any]
    seconds: float = 0.0

    @property
    def digest(self) -> str:
        """sha256 (first 16 hex digits) of the tensors: what an edit records to say which statistics it used."""
        h = hashlib.sha256()
        h.update(self.mean.float().numpy().tobytes())
        h.update(self.second.float().numpy().tobytes())
        h.update(self.reference.float().numpy().tobytes())
        h.update(self.reference_subject.numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def covariance(self) -> torch.Tensor:
        """E[(k − μ)(k − μ)ᵀ]."""
        return self.second - torch.outer(self.mean, self.mean)

    def null_space(self, threshold: float = 2e-2) -> torch.Tensor:
        """(d_ff, r) orthonormal basis of the directions whose eigenvalue of C₀ is below ``threshold``
        (AlphaEdit's rule: an update there leaves the preserved keys' outputs nearly unchanged)."""
        evals, evecs = torch.linalg.eigh(self.second)
        return evecs[:, evals < threshold]

    def save(self, path: str | os.PathLike) -> int:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_fingerprint": self.base_fingerprint,
            "layer": self.layer,
            "count": self.count,
            "source": self.source,
            "seconds": self.seconds,
            "subjects": self.subjects,
        }
        tensors = {
            "reference_subject": self.reference_subject.to(torch.int64).contiguous(),
            "mean": self.mean.float().contiguous(),
            "second": self.second.float().contiguous(),
            "reference": self.reference.float().contiguous(),
        }
        return write_safetensors(path, tensors, manifest)

    @classmethod
    def load(cls, path: str | os.PathLike, vlm: VLM | None = None) -> PreservationStats:
        meta, tensors = read_safetensors(path, "preservation statistics")
        man = read_manifest(
            meta,
            str(path),
            FORMAT,
            FORMAT_VERSION,
            "a preservation-statistics file",
            ("base_fingerprint", "layer", "count"),
        )
        names = {"mean", "second", "reference", "reference_subject"}
        if set(tensors) != names:
            raise StatisticsError(f"{path}: expected the tensors {sorted(names)}, found {sorted(tensors)}")
        mean = check_tensor(tensors["mean"], "mean", str(path), dim=1).double()
        second = check_tensor(tensors["second"], "second", str(path), dim=2).double()
        reference = check_tensor(tensors["reference"], "reference", str(path), dim=2)
        subject = tensors["reference_subject"]
        subjects = list(man.get("subjects") or [])
        if subject.dtype != torch.int64 or tuple(subject.shape) != (reference.shape[0],):
            raise StatisticsError(f"{path}: reference_subject must be one int64 per reference key")
        if len(subject) and (int(subject.min()) < -1 or int(subject.max()) >= len(subjects)):
            raise StatisticsError(f"{path}: reference_subject names subjects the manifest does not list")
        if tuple(second.shape) != (mean.shape[0], mean.shape[0]) or reference.shape[1] != mean.shape[0]:
            raise StatisticsError(
                f"{path}: second moment {tuple(second.shape)} or reference keys {tuple(reference.shape)} do not "
                f"match the mean {tuple(mean.shape)}"
            )
        stats = cls(
            int(man["layer"]),
            int(man["count"]),
            mean,
            second,
            reference,
            subject,
            subjects,
            str(man["base_fingerprint"]),
            dict(man.get("source") or {}),
            float(man.get("seconds") or 0.0),
        )
        if vlm is not None:
            if stats.base_fingerprint != vlm.fingerprint:
                raise StatisticsError(
                    f"{path} holds statistics of the base model {stats.base_fingerprint}, not of the loaded "
                    f"model {vlm.fingerprint}; delete it to recompute"
                )
            d_ff = vlm.module(vlm.arch.module_path("down_proj", stats.layer)).weight.shape[1]
            if mean.shape[0] != d_ff:
                raise StatisticsError(f"{path}: keys of size {mean.shape[0]}, but down_proj takes {d_ff}")
        return stats


def prompts_from_file(vlm: VLM, path: str | os.PathLike, limit: int = DEFAULT_PROMPTS, seed: int = 0):
    """Encoded prompts (question + answer, with the image when there is one) from a JSON list of
    ``{"question", "answer", "image"}`` items (the world's ``questions/*.json``; image paths relative to the
    file's world folder, i.e. the file's grandparent), ``limit`` of them sampled with ``seed``; with the
    source description and what each visual prompt asks about (its ``entity`` and ``relation``; else None)."""
    path = Path(path)
    try:
        items = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StatisticsError(f"cannot read the statistics prompts {path}: {exc}") from None
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) and "question" in i for i in items):
        raise StatisticsError(f"{path} must hold a non-empty JSON list of objects with a 'question'")
    items = list(items)
    random.Random(f"statistics-{seed}").shuffle(items)
    items = items[:limit]
    root = path.parent.parent
    pixels: dict[str, ProcessedImage] = {}
    out = []
    for it in items:
        pv = None
        if it.get("image"):
            if it["image"] not in pixels:
                img = load_image(root / it["image"])
                pixels[it["image"]] = process_image(vlm.processor, img)
            pv = pixels[it["image"]]
        constraints = it.get("constraints") or None
        out.append(
            encode(
                vlm.processor,
                it["question"],
                answer=it.get("answer"),
                constraints=constraints[:1] if constraints and pv is not None else None,
                pixel_values=pv,
            )
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    info = {"prompts": str(path), "prompts_sha256": digest, "sampled": len(out), "seed": seed}
    # what a constraint key is the key of: the fact (subject and relation) where the file says, else the subject
    facts = [":".join(str(it[k]) for k in ("entity", "relation") if it.get(k)) or None for it in items]
    return out, info, [f if it.get("image") else None for f, it in zip(facts, items)]


def compute_statistics(
    vlm: VLM,
    prompts: Sequence[EncodedPrompt],
    layer: int,
    source: dict[str, Any] | None = None,
    subjects: Sequence[str | None] | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> PreservationStats:
    """Accumulate μ and C₀ of ``down_proj`` inputs at ``layer`` over every token of ``prompts``, and keep the
    key at the visual constraint's last token of each prompt that has an image and a constraint, labelled with
    the prompt's subject (``subjects[i]``, when known: one subject's reference keys are claimed together by an
    edit of that subject, ``editors.keygate``)."""
    if not prompts:
        raise StatisticsError("preservation statistics need at least one prompt")
    t0 = time.perf_counter()
    total, s1, s2, reference, label = 0, None, None, [], []
    names: dict[str, int] = {}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        inputs = collate(chunk, vlm.tokenizer.pad_token_id)
        run = run_patched(vlm, inputs, capture=[("mlp_in", layer)], stop_after_layer=layer)
        x = run.captured[("mlp_in", layer)]
        mask = inputs["attention_mask"].to(x.device).bool()
        k = x[mask].double()  # (tokens, d_ff)
        s1 = k.sum(0) if s1 is None else s1 + k.sum(0)
        s2 = k.T @ k if s2 is None else s2 + k.T @ k
        total += k.shape[0]
        for row, p in enumerate(chunk):
            if p.image_span is not None and p.constraint_spans:
                reference.append(x[row, p.constraint_last].float().cpu())
                subject = subjects[start + row] if subjects is not None else None
                label.append(names.setdefault(subject, len(names)) if subject else -1)
            # a sample of the other tokens, image tokens included (every OTHER_TOKEN_STRIDE-th)
            skip = p.constraint_last if p.image_span is not None and p.constraint_spans else -1
            others = [t for t in range(row % OTHER_TOKEN_STRIDE, p.length, OTHER_TOKEN_STRIDE) if t != skip]
            if others:
                reference.extend(x[row, others].float().cpu())
                label.extend([-1] * len(others))
        if progress:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    keep = distinct(torch.stack(reference), s1 / total) if reference else torch.zeros(0, dtype=torch.long)
    return PreservationStats(
        layer,
        total,
        (s1 / total).cpu(),
        (s2 / total).cpu(),
        torch.stack(reference)[keep] if reference else torch.zeros(0, s1.shape[0]),
        torch.tensor(label, dtype=torch.int64)[keep] if reference else torch.zeros(0, dtype=torch.int64),
        list(names),
        vlm.fingerprint,
        dict(source or {}),
        round(time.perf_counter() - t0, 3),
    )


def distinct(keys: torch.Tensor, mean: torch.Tensor, cos: float = REFERENCE_DISTINCT, chunk: int = 256) -> torch.Tensor:
    """The indices of ``keys`` less those whose centred cosine with an earlier kept one is ``cos`` or more
    (greedy, in order)."""
    unit = keys.float() - mean.float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    kept: list[int] = []
    kept_unit = torch.zeros(0, keys.shape[1])
    for start in range(0, len(keys), chunk):
        block = unit[start : start + chunk]
        fresh = (block @ kept_unit.T).max(dim=1).values < cos if len(kept) else torch.ones(len(block), dtype=torch.bool)
        sims = block @ block.T
        chosen: list[int] = []
        for i in range(len(block)):
            if fresh[i] and all(float(sims[i, j]) < cos for j in chosen):
                chosen.append(i)
        kept += [start + i for i in chosen]
        kept_unit = torch.cat([kept_unit, block[chosen]])
    return torch.tensor(kept, dtype=torch.long)


def statistics_path(vlm: VLM, layer: int) -> Path:
    """Where the statistics of ``layer`` live: beside the model if its folder is writable, else in
    ``$EDITLENS_HOME/statistics/<fingerprint>/``."""
    folder = Path(vlm.path) / FOLDER
    if os.access(vlm.path, os.W_OK) or folder.is_dir() and os.access(folder, os.W_OK):
        return folder / f"layer-{layer}.safetensors"
    return statistics_dir() / vlm.fingerprint / f"layer-{layer}.safetensors"


def default_prompt_file(vlm: VLM) -> Path | None:
    """The world's training questions when ``vlm`` is a world's model (``WorldFolder.of_model``), else None."""
    world = WorldFolder.of_model(vlm)
    candidate = world.questions_file("train") if world is not None else None
    return candidate if candidate is not None and candidate.is_file() else None


_CACHE: dict[tuple[str, int], PreservationStats] = {}


def preservation_statistics(
    vlm: VLM,
    layer: int,
    prompts_file: str | os.PathLike | None = None,
    limit: int = DEFAULT_PROMPTS,
    progress: Callable[[int, int], None] | None = None,
) -> PreservationStats:
    """The statistics of (``vlm``, ``layer``): from memory, from their file, or computed once and stored.

    ``prompts_file`` (default: the world's training questions) is only read when they must be computed.
    """
    key = (vlm.fingerprint, layer)
    if key in _CACHE:
        return _CACHE[key]
    path = statistics_path(vlm, layer)
    if path.is_file():
        stats = PreservationStats.load(path, vlm)
    else:
        source_file = Path(prompts_file) if prompts_file else default_prompt_file(vlm)
        if source_file is None:
            raise StatisticsError(
                f"no preservation statistics for layer {layer} of {vlm.path} yet, and no prompts to compute them "
                "from: give a question file (a JSON list of {question, answer, image}) with "
                "`editlens stats --layer N --prompts FILE`"
            )
        prompts, source, subjects = prompts_from_file(vlm, source_file, limit)
        stats = compute_statistics(vlm, prompts, layer, source, subjects, progress=progress)
        stats.save(path)
    _CACHE[key] = stats
    return stats
