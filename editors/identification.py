"""Does the model tell one subject's renderings from every other subject's? ``identification`` and
``key_identification`` of ``editlens world check``.

An edit is asked about one image of its subject; it should answer on the subject's other images and nowhere
else. That needs features in which another rendering of the subject is nearer to the edit image than any other
subject's image is. Measured on the looks no world entity uses (the edit stream's new entities, which the
model never saw: what an insertion edit is about), each with three renderings (the edit image, another
rendering, a held-out one, ``vlm.world.stream``):

* ``identification``: for each of the other two renderings, is the nearest edit image (centred cosine over
  every new entity's edit image) its own subject's? Features: the mean patch feature the language model reads
  (LLaVA: the selected CLIP layer, class token dropped; Qwen2-VL: the merged tokens) — ``image_features``.
* ``key_identification``: the same at the default editor's key, the ``down_proj`` input of ``layer`` at the
  constraint's last token of the subject's first question (what KeyGate stores and compares).

Chance is 1 / the number of subjects. The centre is the mean of the features compared (KeyGate centres by the
mean key of its preservation statistics; on these keys the two differ little).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlm.images import batch_images, load_image, process_image
from vlm.loading import VLM
from vlm.prompts import encode
from vlm.scoring import batches
from vlm.world.stream import edit_stream, load_world, render_stream_images
from vlm.world.train import image_features

from .compute_key import constraint_keys

#: which renderings of a subject are asked (the edit image is the reference)
QUERIES = ("image_rephrase", "image_heldout")


def _nearest_is_own(refs: torch.Tensor, queries: dict[str, torch.Tensor]) -> dict[str, float]:
    """For each query set (n, d) against references (n, d), row i belonging to subject i: the share whose
    nearest reference (centred cosine) is its own."""
    centre = torch.cat([refs, *queries.values()]).mean(0)

    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x - centre
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    table, own = unit(refs), torch.arange(refs.shape[0])
    rates = {k: float(((unit(q) @ table.T).argmax(-1) == own).float().mean()) for k, q in queries.items()}
    rates["all"] = sum(rates.values()) / len(queries)
    return rates


def subject_records(world_dir: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """One edit-stream record per new entity (its first fact), in stream order; their images drawn."""
    records, seen = [], set()
    for rec in edit_stream(load_world(world_dir)):
        if rec["type"] == "new_entity" and rec["entity"] not in seen:
            seen.add(rec["entity"])
            records.append(rec)
    records = records[:limit] if limit else records
    render_stream_images(world_dir, records)
    return records


@torch.no_grad()
def identification(vlm: VLM, world_dir: str | Path, layer: int = 0, limit: int | None = None) -> dict[str, Any]:
    """``identification`` and ``key_identification`` over the world's new entities (see the module docstring);
    ``limit``: the first that many entities only."""
    world_dir = Path(world_dir)
    records = subject_records(world_dir, limit)
    if len(records) < 2:
        raise ValueError("identification needs at least two subjects")
    pixels = {
        rel: process_image(vlm.processor, load_image(world_dir / rel))
        for rec in records
        for rel in (rec["image"], *(rec[q] for q in QUERIES))
    }

    def features(field: str) -> torch.Tensor:
        out = []
        for chunk in batches([pixels[r[field]] for r in records], 64):
            batch = batch_images(list(chunk), dtype=vlm.dtype)
            out.append(image_features(vlm.model, {k: v.to(vlm.device) for k, v in batch.items()}).float().cpu())
        return torch.cat(out)

    def keys(field: str) -> torch.Tensor:
        prompts = [
            encode(vlm.processor, r["src"], constraints=[r["constraint"]], pixel_values=pixels[r[field]])
            for r in records
        ]
        return torch.cat([constraint_keys(vlm, list(c), layer).cpu() for c in batches(prompts, 64)])

    image = _nearest_is_own(features("image"), {q: features(q) for q in QUERIES})
    key = _nearest_is_own(keys("image"), {q: keys(q) for q in QUERIES})
    return {
        "identification": image["all"],
        "key_identification": key["all"],
        "identification_by_rendering": {q: image[q] for q in QUERIES},
        "key_identification_by_rendering": {q: key[q] for q in QUERIES},
        "identification_subjects": len(records),
        "identification_chance": 1 / len(records),
        "key_layer": layer,
    }
