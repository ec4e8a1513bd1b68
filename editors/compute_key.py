"""MultEdit's key (Basu et al. §5, App. G; ROME's ``compute_u``): step 1 of a key/value edit.

The key k ∈ R^{d_ff} of a request is the input of ``down_proj`` at layer ℓ at
the last token of its visual constraint ("this landmark"), read in one forward
pass. MultEdit, AlphaEdit and KeyGate all key their edits by it; the world
check's identification measures how well it names a subject.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlm.loading import VLM
from vlm.patching import run_patched
from vlm.prompts import EncodedPrompt, collate


def constraint_keys(vlm: VLM, prompts: Sequence[EncodedPrompt], layer: int) -> torch.Tensor:
    """(n, d_ff) inputs of ``down_proj`` at ``layer`` at each prompt's constraint last token."""
    inputs = collate(prompts, vlm.tokenizer.pad_token_id)
    run = run_patched(vlm, inputs, capture=[("mlp_in", layer)])
    x = run.captured[("mlp_in", layer)]
    pos = torch.tensor([p.constraint_last for p in prompts], device=x.device)
    return x[torch.arange(len(prompts), device=x.device), pos].float()
