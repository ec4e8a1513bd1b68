"""What every editor takes and reports: the edit request and its progress events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diagnostics.cases import world_phrases
from vlm.images import ImageInput, ProcessedImage


@dataclass
class EditRequest:
    """One fact to write: for (image, question) the answer becomes ``answer``.

    ``constraint`` is the visual constraint as it occurs in the question
    ("this landmark"); the edit is made at its last token.
    """

    question: str
    constraint: str
    answer: str
    image: ImageInput | None = None
    pixel_values: ProcessedImage | torch.Tensor | None = None  # the image already processed (process_image)
    case_id: str | None = None
    rephrase: str | None = None  # the question reworded (layer="auto"; KeyGate's variants)
    image_rephrase: ImageInput | None = None  # another image of the subject (layer="auto"; KeyGate's variants)
    replacements: list[str] = field(default_factory=list)  # named entities to corrupt the constraint with (auto)

    @classmethod
    def from_case(
        cls,
        case: dict[str, Any],
        world_dir: str | Path | None = None,
        pixel_values: ProcessedImage | torch.Tensor | None = None,
        variants: bool = True,
    ) -> EditRequest:
        """A request from a record in the world's edit-case format (image relative to ``world_dir``); with
        ``variants=False`` without the record's rephrase and image rephrase — the edit alone, as E-VQA gives it
        to an editor, when those are the probes an evaluation asks afterwards."""

        def where(rel):
            return None if rel is None else Path(world_dir) / rel if world_dir is not None else rel

        return cls(
            case["src"],
            case["constraint"],
            case["alt"],
            image=where(case["image"]),
            pixel_values=pixel_values,
            case_id=case.get("case_id"),
            rephrase=case.get("rephrase") if variants else None,
            image_rephrase=where(case.get("image_rephrase")) if variants else None,
            replacements=world_phrases(Path(world_dir)) if world_dir is not None else [],
        )

    def describe(self) -> dict[str, Any]:
        if isinstance(self.image, (str, Path)):
            image = str(self.image)
        elif isinstance(self.image, (bytes, bytearray)):
            image = f"<{len(self.image)} bytes>"
        elif self.image is None:
            image = None if self.pixel_values is None else "<pixel values>"
        else:
            image = f"<{type(self.image).__name__}>"
        out = {"question": self.question, "constraint": self.constraint, "answer": self.answer, "image": image}
        if self.case_id:
            out["case_id"] = self.case_id
        return out


@dataclass
class EditProgress:
    """What an editor is doing: ``stage`` layer (choosing it, layer="auto") | key | value | update | done,
    for edit ``edit`` of ``edits``."""

    stage: str
    edit: int
    edits: int
    step: int = 0
    steps: int = 0
    loss: float | None = None


ProgressCallback = Callable[[EditProgress], None]
