"""What a diagnostic looks at: one question about one image, and where its constraint is.

A ``DiagnosticCase`` is (image, question, visual constraint, optional answer,
optional ground truth). Without an answer the diagnostics follow the
model's own prediction O: the argmax token at the last prompt position,
as the papers do. Probabilities are always of O's first token at the last
prompt position (ROME, MultiModalCausalTrace, Zhang et al.'s knockout and
VisEdit's key token all score one next-token prediction).

``load_cases`` reads a JSON file of the world's edit-case records
(``edit_cases/test.json``: src, rephrase, constraint, image, image_rephrase,
image_heldout, ground_truth ...) and turns each record into one case per
requested variant.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm.images import ImageInput, ProcessedImage, load_image, process_image
from vlm.loading import VLM
from vlm.patching import run_patched
from vlm.prompts import EncodedPrompt, collate, encode
from vlm.world.folder import world_phrases  # the world a case file lies in: its phrases (re-exported)

from .errors import DiagnosticError

# variant name → (image field, question field)
VARIANTS = {
    "src": ("image", "src"),
    "rephrase": ("image", "rephrase"),
    "image_rephrase": ("image_rephrase", "src"),
    "image_heldout": ("image_heldout", "src"),
}


@dataclass
class DiagnosticCase:
    question: str
    constraint: str
    image: ImageInput | None = None
    answer: str | None = None  # the answer to follow; None: the model's own prediction
    ground_truth: str | None = None  # the correct answer, for correctness labels
    label: str = ""
    replacements: list[str] = field(default_factory=list)  # candidate phrases for token replacement
    pixel_values: ProcessedImage | torch.Tensor | None = field(default=None, repr=False)


@dataclass
class Prepared:
    """A case encoded and run once clean: what every diagnostic starts from."""

    case: DiagnosticCase
    prompt: EncodedPrompt  # without answer tokens; last_prompt_pos predicts O
    target_id: int  # O's first token
    target_token: str
    p_clean: float
    predicted_id: int  # the model's argmax at the last prompt position
    tokens: list[str]
    gt_id: int | None = None  # first token of the ground truth

    @property
    def last(self) -> int:
        return self.prompt.last_prompt_pos

    @property
    def correct(self) -> bool | None:
        """Does the model's prediction start the ground truth? None without a ground truth."""
        return None if self.gt_id is None else self.predicted_id == self.gt_id


def first_token(vlm: VLM, text: str) -> int:
    ids = vlm.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise DiagnosticError(f"the answer {text!r} encodes to no tokens")
    return int(ids[0])


def prepare(vlm: VLM, case: DiagnosticCase) -> Prepared:
    """Encode the case (checking the constraint) and run it once clean."""
    prompt = encode(
        vlm.processor, case.question, image=case.image, constraints=[case.constraint], pixel_values=case.pixel_values
    )
    if prompt.image_span is None:
        raise DiagnosticError("the diagnostics study visual questions: the case needs an image")
    run = run_patched(vlm, collate([prompt], vlm.tokenizer.pad_token_id))
    probs = torch.softmax(run.logits_at([0], [prompt.last_prompt_pos])[0], dim=-1)
    predicted = int(probs.argmax())
    target = predicted if case.answer is None else first_token(vlm, case.answer)
    gt = first_token(vlm, case.ground_truth) if case.ground_truth else None
    return Prepared(
        case=case,
        prompt=prompt,
        target_id=target,
        target_token=vlm.tokenizer.convert_ids_to_tokens(target),
        p_clean=float(probs[target]),
        predicted_id=predicted,
        tokens=vlm.tokenizer.convert_ids_to_tokens(prompt.input_ids.tolist()),
        gt_id=gt,
    )


def _resolve(folder: Path, rel: str) -> Path:
    for base in (folder, folder.parent):
        if (base / rel).exists():
            return base / rel
    raise DiagnosticError(f"image {rel!r} not found next to the case file ({folder}) or in its parent")


def load_cases(
    path: str | Path,
    variants: Sequence[str] = ("src",),
    limit: int | None = None,
    vlm: VLM | None = None,
    answer: str = "model",
) -> list[DiagnosticCase]:
    """Cases from a JSON list of edit-case records (or {"cases": [...]}).

    ``answer``: "model" follows the model's prediction, "ground_truth" or
    "alt" follows that field of the record. Images are resolved against the
    file's folder, then its parent (the world's layout); with ``vlm`` the
    pixels are processed once per image file.
    """
    path = Path(path)
    try:
        data: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise DiagnosticError(f"case file {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DiagnosticError(f"case file {path} is not readable JSON: {e}") from None
    if isinstance(data, dict):
        data = data.get("cases", [data] if "src" in data else None)
    if not isinstance(data, list) or not data:
        raise DiagnosticError(f"case file {path} holds no list of cases")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise DiagnosticError(f"unknown variant(s) {bad}; choose from {sorted(VARIANTS)}")
    if answer not in ("model", "ground_truth", "alt"):
        raise DiagnosticError(f"answer must be 'model', 'ground_truth' or 'alt', not {answer!r}")
    pixels: dict[Path, torch.Tensor] = {}
    names = world_phrases(path)
    out: list[DiagnosticCase] = []
    for i, rec in enumerate(data[:limit] if limit else data):
        if not isinstance(rec, dict):
            raise DiagnosticError(f"case {i} of {path} is not an object")
        for v in variants:
            img_field, q_field = VARIANTS[v]
            missing = [f for f in (img_field, q_field, "constraint") if not rec.get(f)]
            if missing:
                raise DiagnosticError(f"case {rec.get('case_id', i)} of {path} lacks {missing}")
            img = _resolve(path.parent, rec[img_field])
            pv = None
            if vlm is not None:
                if img not in pixels:
                    pixels[img] = process_image(vlm.processor, load_image(img))
                pv = pixels[img]
            out.append(
                DiagnosticCase(
                    question=rec[q_field],
                    constraint=rec["constraint"],
                    image=img,
                    pixel_values=pv,
                    answer=None if answer == "model" else rec.get(answer),
                    ground_truth=rec.get("ground_truth"),
                    label=f"{rec.get('case_id', i)}/{v}",
                    replacements=[n for n in names if rec.get("entity_name") not in n],
                )
            )
    return out
