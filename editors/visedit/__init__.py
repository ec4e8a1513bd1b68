"""VisEdit (Chen et al. 2024): a trained Visual Edit ADapter (VEAD) that edits a VLLM through
its visual representations.

* ``adapter``  — the VEAD (cross-attention to the edit signal, influence mapper) and its hooks;
* ``data``     — training samples from the training split of a world's edit cases;
* ``train``    — training with the base model frozen: checkpoints, resume, best by validation loss;
* ``edit_set`` — the file format: the adapter once plus one signal per edit (safetensors);
* ``editor``   — editing with a trained adapter: an edit is its signal (one forward pass);
* ``scope``, ``calibration`` — the scope gate (which subject, which relation) and its calibration.

The package registers the editor (here, where its editor and its trainer meet: ``editor`` must not import
``train``, which builds on it).
"""

from editors.configs import VisEditTrainConfig
from editors.registry import EditorSpec, EditorTrainer, register_editor

from .adapter import VEAD, AttachedVEAD, EditSignal, SignalBatch, VEADConfig
from .edit_set import FORMAT, VisEditSet
from .editor import VisEdit, VisEditConfig, compute_signals, create_visedit, world_adapter
from .train import train_visedit

register_editor(
    EditorSpec(
        name="visedit",
        config_class=VisEditConfig,
        edit_set_class=VisEditSet,
        editor_class=VisEdit,
        format=FORMAT,
        description="a signal of a trained visual edit adapter, the VEAD (Chen et al. 2024)",
        create_fn=create_visedit,
        world_options=world_adapter,
        layer_rule="vead",  # the VEAD rule: before the high module-contribution layers
        trainer=EditorTrainer(VisEditTrainConfig, train_visedit),
        peft_refusal="a VisEdit edit set is an adapter on the visual states, not a weight change",
        gate="scope",  # once calibrated (``calibration``): its edits act inside their scope only
    )
)

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
