"""The editor registry: an editor is one module plus one ``register_editor`` call.

Modelled on PEFT's ``register_peft_method`` / ``PEFT_TYPE_TO_CONFIG_MAPPING``:
each editor registers, once, an ``EditorSpec`` naming

* its ``name`` (what a request, a version's manifest and ``GetServerInfo``
  call it; also the file ``<name>.safetensors`` its edit set is stored as in a
  registry version),
* its ``config_class`` (a dataclass whose ``option()`` fields carry defaults
  and help; the CLI and the server derive their options from it),
* its ``edit_set_class`` (an ``EditSetBase``: save / load / attach / describe),
* ``create(vlm, config, context)``, which builds the editor (an
  ``EditorBase``: edit, edit_sequentially, edit_each, manifest_records),
* and its capabilities: the diagnostic that picks its layer (``layer_rule``),
  its ``trainer`` (an editor trained before it edits), why it cannot be a
  PEFT adapter (``peft_refusal``) and what gates its edits (``gate``).

Everything else — the server's bundles and Edit call, the CLI, the bench —
looks editors up here and never branches on their names. The built-in
editors (MultEdit, FT-L, VisEdit) register themselves when ``editors`` is
imported; a test registers a trivial one of its own and serves it end to end.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.loading import VLM
from vlm.options import ConfigError, build_config

from .base import EditorBase, EditSetBase

#: (editor name, adapter, version or 0 for its live one) -> (that registry version's edit set of the editor,
#: the version number it came from)
EditSetLookup = Callable[[str, str, int], tuple[EditSetBase, int]]


@dataclass
class EditContext:
    """What an editor may need beyond the model and its config, given by whoever runs it.

    ``lookup``: reads an edit set of a registry version (the server gives it; e.g. VisEdit's trained adapter
    lives in a version). ``replacements``: named-entity phrases the layer choice may corrupt the constraint with.
    """

    lookup: EditSetLookup | None = None
    replacements: list[str] = field(default_factory=list)


def _default_create(spec: EditorSpec, vlm: VLM, config: Any, context: EditContext) -> EditorBase:
    return spec.editor_class(vlm, config)


#: (model, world folder, output folder, trainer config, progress) -> the training summary, with ``adapter_path``
#: (the trained edit set's file) and optionally ``figure`` and ``layer_evidence``
TrainFn = Callable[[VLM, Path, Path, Any, Callable[[Any], None] | None], dict[str, Any]]


@dataclass(frozen=True)
class EditorTrainer:
    """How an editor that must be trained before it edits is trained (VisEdit's VEAD): the trainer's settings
    (a dataclass of ``option()`` fields, what TrainVisEdit and ``editlens visedit train`` offer) and the run."""

    config_class: type
    train: TrainFn


#: what a gate decides on (``EditorSpec.gate``)
GATES = ("key", "scope")


@dataclass(frozen=True)
class EditorSpec:
    name: str
    config_class: type
    edit_set_class: type[EditSetBase]
    editor_class: type[EditorBase]
    format: str  # the ``format`` of the edit set's file manifest
    description: str = ""
    create_fn: Callable[[EditorSpec, VLM, Any, EditContext], EditorBase] = _default_create
    #: the config options this editor takes from a world folder by default (e.g. VisEdit's trained adapter)
    world_options: Callable[[Path], dict[str, Any]] | None = None
    #: the diagnostics rule that picks its layer for layer="auto" (``diagnostics.recommend.LAYER_RULES``:
    #: "mlp_peak", the causal trace's MLP peak at the constraint; "vead", the VEAD rule); None: no such rule
    layer_rule: str | None = None
    #: the editor's trainer when it is trained before it edits (VisEdit: TrainVisEdit trains it); None: no training
    trainer: EditorTrainer | None = None
    #: why its edit sets cannot be exported as a PEFT LoRA adapter; None: they can (low-rank weight deltas)
    peft_refusal: str | None = "its edit set is not a low-rank weight delta"
    #: what gates its edits: None (they change every input), "key" (a gate on the edited module's input keys, as
    #: KeyGate's) or "scope" (an image-and-question scope gate, as VisEdit's); the benches probe gates by it
    gate: str | None = None

    def __post_init__(self) -> None:
        if self.gate is not None and self.gate not in GATES:
            raise ValueError(f"editor {self.name!r}: gate must be one of {', '.join(GATES)} or None, not {self.gate!r}")

    @property
    def file_name(self) -> str:
        """The file a registry version stores this editor's edit set as."""
        return f"{self.name}.safetensors"

    def config(self, vlm: VLM | None = None, **options: Any) -> Any:
        """The editor's config from named options (the rest take their defaults), checked against ``vlm``."""
        config = build_config(self.config_class, options)
        if vlm is not None:
            config.check(vlm)
        return config

    def create(self, vlm: VLM, config: Any = None, context: EditContext | None = None) -> EditorBase:
        """The editor for ``vlm`` with ``config`` (default: the config's defaults)."""
        config = self.config(vlm) if config is None else config
        return self.create_fn(self, vlm, config, context or EditContext())

    def load(self, path: str | Path, vlm: VLM | None = None) -> EditSetBase:
        """Read and validate an edit set of this editor."""
        return self.edit_set_class.load(path, vlm)


#: the editor an edit uses when it names none (the SDK, the CLI, an Edit request with EDITOR_UNSPECIFIED)
DEFAULT_EDITOR = "keygate"

_EDITORS: dict[str, EditorSpec] = {}
#: the modules of the built-in editors; each registers its editor when imported (on the first lookup)
BUILTIN_EDITORS = ("editors.multedit", "editors.keygate", "editors.alphaedit", "editors.visedit", "editors.finetune")
_builtins_loaded = False
#: re-entrant: a built-in module's import may itself look an editor up (it registers from this thread)
_builtins_lock = threading.RLock()


def _load_builtins() -> None:
    """Import the built-in editors' modules once. Thread-safe: a lookup from any thread returns only after every
    built-in is registered (the flag was set before the imports, so a concurrent first lookup on a cold server
    found no editor or half of them)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _builtins_lock:
        if _builtins_loaded:
            return
        for module in BUILTIN_EDITORS:
            importlib.import_module(module)
        _builtins_loaded = True


def register_editor(spec: EditorSpec) -> EditorSpec:
    """Make an editor known by name; registering a name twice is an error (unless it is the same spec)."""
    if not spec.name or not spec.name.replace("_", "").replace("-", "").isalnum() or spec.name != spec.name.lower():
        raise ValueError(f"an editor name is lower-case letters, digits, '-' or '_', not {spec.name!r}")
    if not dataclasses.is_dataclass(spec.config_class):
        raise TypeError(f"editor {spec.name!r}: its config class must be a dataclass")
    known = _EDITORS.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"an editor named {spec.name!r} is registered already")
    _EDITORS[spec.name] = spec
    return spec


def unregister_editor(name: str) -> None:
    """Forget an editor (tests that register one of their own clean up with this)."""
    _EDITORS.pop(name, None)


def _builtin_rank(spec: EditorSpec) -> int:
    """The place of a built-in editor's module in ``BUILTIN_EDITORS``; after them, every other editor."""
    module = spec.editor_class.__module__
    for i, name in enumerate(BUILTIN_EDITORS):
        if module == name or module.startswith(name + "."):
            return i
    return len(BUILTIN_EDITORS)


def editor_names() -> list[str]:
    """The registered editors: the built-in ones in ``BUILTIN_EDITORS`` order (whichever module was imported
    first), then any registered later, in the order they were registered. A version's manifest lists its
    editors in this order."""
    _load_builtins()
    order = {name: i for i, name in enumerate(_EDITORS)}
    return sorted(_EDITORS, key=lambda n: (_builtin_rank(_EDITORS[n]), order[n]))


def layer_rule(editor: str) -> str:
    """The recommend diagnostic's rule for ``editor`` ("both": every rule); a ``ConfigError`` for an unknown
    editor or one that chooses no layer by a diagnostic."""
    if editor == "both":
        return editor
    spec = get_editor(editor)
    if spec.layer_rule is None:
        with_rule = [n for n in editor_names() if get_editor(n).layer_rule]
        raise ConfigError(f"editor {editor!r} chooses no layer by a diagnostic; those that do: {', '.join(with_rule)}")
    return spec.layer_rule


def trained_editor() -> EditorSpec:
    """The editor TrainVisEdit trains: the one registered with a trainer (VisEdit's); a ``ConfigError`` when
    none or several are."""
    found = [get_editor(n) for n in editor_names() if get_editor(n).trainer is not None]
    if len(found) != 1:
        names = ", ".join(s.name for s in found) or "none"
        raise ConfigError(f"training needs exactly one editor registered with a trainer; this EditLens has {names}")
    return found[0]


def get_editor(name: str) -> EditorSpec:
    """The spec of editor ``name``; a ``ConfigError`` naming the known ones otherwise."""
    _load_builtins()
    try:
        return _EDITORS[name]
    except KeyError:
        raise ConfigError(f"unknown editor {name!r}; this EditLens has {', '.join(editor_names())}") from None
