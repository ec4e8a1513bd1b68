"""Export an edit set as a PEFT LoRA adapter.

Every edited module becomes a LoRA layer whose rank is the number of its
rank-one columns, concatenated (never PEFT's "linear" combination of
adapters, which would add cross terms): ``lora_A = Vᵀ`` (r × d_in),
``lora_B = U`` (d_out × r) and ``lora_alpha = r``, so PEFT's scaling
alpha / r is 1 and the LoRA layer adds exactly U Vᵀ x. The folder holds
``adapter_model.safetensors`` and ``adapter_config.json`` and loads with plain
``peft.PeftModel.from_pretrained(base_model, folder)``. The EditLens manifest
(base-model fingerprint, editor, records) rides along in the safetensors
metadata.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .edit_set import EditSet, EditSetError
from .registry import editor_names, get_editor

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def not_exportable(editor: str) -> str | None:
    """Why an edit set of ``editor`` cannot be a PEFT LoRA adapter (its ``EditorSpec.peft_refusal``, as a message
    that names the editors that do export); None when it can. An editor this EditLens does not know exports
    nothing."""
    if editor in editor_names():
        why = get_editor(editor).peft_refusal
        if why is None:
            return None
    else:
        why = f"a {editor or 'non-EditLens'} edit set is not a low-rank weight delta"
    exporting = [n for n in editor_names() if get_editor(n).peft_refusal is None]
    return f"cannot export to PEFT: {why}; export an edit set of {' or '.join(exporting)} instead"


def export_peft(edit_set: EditSet, out_dir: str | os.PathLike, base_model_path: str | None = None) -> Path:
    """Write the adapter folder; returns its path. Only low-rank weight deltas (MultEdit, AlphaEdit) export: an
    edit set of another kind (a KeyGate gate, a VisEdit adapter, FT-L's dense change) is refused, saying why."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if not isinstance(edit_set, EditSet):
        editor = getattr(edit_set, "editor", "")
        raise EditSetError(not_exportable(editor) or f"cannot export to PEFT: a {editor} edit set of another format")
    if not edit_set.deltas:
        raise EditSetError("the edit set has no deltas to export")
    merged = edit_set.merged()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EditSetError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    ranks = {d.module: d.rank for d in merged.deltas}
    r = max(ranks.values())
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        bias="none",
        target_modules=sorted(ranks),
        rank_pattern={re.escape(m): k for m, k in ranks.items() if k != r},
        alpha_pattern={re.escape(m): k for m, k in ranks.items() if k != r},
        base_model_name_or_path=base_model_path,
        inference_mode=True,
    )
    tensors = {}
    for d in merged.deltas:
        prefix = f"base_model.model.{d.module}"
        tensors[f"{prefix}.lora_A.weight"] = d.V.float().T.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = d.U.float().contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt", "editlens": json.dumps(merged.manifest())})
    config.save_pretrained(str(out))
    return out
