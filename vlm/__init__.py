"""Model access: loading LLaVA-family checkpoints, prompt encoding with token
spans, answer scoring, batched activation patching, and (in ``vlm.world``)
the synthetic world with its tiny model.

Nothing in this package knows about gRPC or MLflow.
"""

from .architecture import ARCHITECTURES, ArchitectureMap, architecture_for
from .errors import ConstraintNotFoundError, ImageDecodeError, ModelLoadError, PromptError, VLMError
from .images import load_image
from .loading import VLM, fingerprint_folder, load_vlm
from .patching import Knockout, Patch, PatchedRun, run_patched
from .prompts import EncodedPrompt, collate, encode
from .scoring import AnswerScore, ask, generate, score_answers, score_batch

__all__ = [
    "ARCHITECTURES", "ArchitectureMap", "architecture_for", "ConstraintNotFoundError", "ImageDecodeError",
    "ModelLoadError", "PromptError", "VLMError", "load_image", "VLM", "fingerprint_folder", "load_vlm",
    "Knockout", "Patch", "PatchedRun", "run_patched", "EncodedPrompt", "collate", "encode",
    "AnswerScore", "ask", "generate", "score_answers", "score_batch",
]
