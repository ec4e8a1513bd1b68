"""VisEdit (Chen et al. 2024): a trained Visual Edit ADapter (VEAD) that edits a VLLM through
its visual representations.

* ``adapter``  — the VEAD (cross-attention to the edit signal, influence mapper) and its hooks;
* ``data``     — training samples from the training split of a world's edit cases;
* ``train``    — training with the base model frozen: checkpoints, resume, best by validation loss;
* ``edit_set`` — the file format: the adapter once plus one signal per edit (safetensors);
* ``editor``   — editing with a trained adapter: an edit is its signal (one forward pass).
"""

from .adapter import VEAD, AttachedVEAD, EditSignal, SignalBatch, VEADConfig
from .edit_set import FORMAT, VisEditSet
from .editor import VisEdit, VisEditConfig, compute_signals

__all__ = [
    "VEAD",
    "AttachedVEAD",
    "EditSignal",
    "SignalBatch",
    "VEADConfig",
    "FORMAT",
    "VisEditSet",
    "VisEdit",
    "VisEditConfig",
    "compute_signals",
]
