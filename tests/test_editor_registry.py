"""A new editor is one module plus one registration: this file defines a trivial editor (its edits are zero
deltas, so they change nothing), registers it, and drives it through the real server: edit -> version ->
generate -> a second edit on top -> rollback. Nothing outside this file knows about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch

from client import sdk
from editors import EditorSpec, editor_names, get_editor, register_editor, unregister_editor
from editors.attach import AttachedDeltas
from editors.base import EditorBase, EditSetBase
from editors.edit_set import LowRankDelta
from editors.files import check_fingerprint
from vlm.options import ConfigError, option

FORMAT = "tests.zero_edit_set"


@dataclass
class ZeroConfig:
    layer: int = option(0, "The layer whose down projection gets the (zero) delta.")

    def check(self, vlm) -> None:
        if not 0 <= self.layer < vlm.num_layers:
            raise ConfigError(f"layer {self.layer} is outside 0..{vlm.num_layers - 1}")


@dataclass
class ZeroEditSet(EditSetBase):
    base_fingerprint: str
    layer: int
    records: list[dict[str, Any]] = field(default_factory=list)
    editor: str = "zero"

    def _delta(self, vlm) -> LowRankDelta:
        module = vlm.arch.module_path("down_proj", self.layer)
        w = vlm.module(module).weight
        return LowRankDelta(self.layer, module, torch.zeros(w.shape[0], 1), torch.zeros(w.shape[1], 1))

    def attach(self, vlm, rows=None):
        return AttachedDeltas(vlm, [self._delta(vlm)], rows)

    def check_compatible(self, vlm) -> None:
        check_fingerprint(self.base_fingerprint, vlm, "this zero edit set")

    # the file: EditSetBase writes the header, saves and loads; an editor says its format and its fields
    FORMAT: ClassVar[str] = FORMAT
    KIND: ClassVar[str] = "a zero edit set"
    REQUIRED: ClassVar[tuple[str, ...]] = ("layer",)

    def manifest_body(self) -> dict[str, Any]:
        return {"layer": self.layer}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"marker": torch.zeros(1)}

    @classmethod
    def from_manifest(cls, man, tensors, source) -> ZeroEditSet:
        return cls(man["base_fingerprint"], int(man["layer"]), list(man["records"]))


class ZeroEditor(EditorBase):
    name = "zero"

    def __init__(self, vlm, config: ZeroConfig):
        self.vlm, self.config = vlm, config

    def hyperparameters(self, mode: str) -> dict[str, Any]:
        return {"layer": self.config.layer, "mode": mode}

    def _records(self, requests) -> list[dict[str, Any]]:
        return [
            {"request": r.describe(), "editor": self.name, "layer": self.config.layer, "metrics": {}} for r in requests
        ]

    def edit(self, requests, onto=None, progress=None) -> ZeroEditSet:
        earlier = onto.records if onto is not None else []
        return ZeroEditSet(self.vlm.fingerprint, self.config.layer, earlier + self._records(requests))

    edit_sequentially = edit

    def edit_each(self, requests, batch_size=16, progress=None) -> list[ZeroEditSet]:
        return [self.edit([r]) for r in requests]


@pytest.fixture(scope="module")
def zero_editor():
    spec = register_editor(
        EditorSpec(
            name="zero",
            config_class=ZeroConfig,
            edit_set_class=ZeroEditSet,
            editor_class=ZeroEditor,
            format=FORMAT,
            description="changes nothing",
        )
    )
    yield spec
    unregister_editor("zero")


def test_a_registered_editor_is_served_end_to_end(zero_editor, start_service, insertion_case, world_dir):
    c = insertion_case
    img = world_dir / c["image"]
    svc = start_service()
    with svc.client() as lens:
        assert "zero" in lens.info().editors and get_editor("zero") is zero_editor and "zero" in editor_names()
        with pytest.raises(sdk.FailedPreconditionError, match="does not reach its own answer"):
            lens.edit(img, c["src"], c["constraint"], c["ground_truth"], adapter="z", editor="zero", layer=1)
        v1 = lens.edit(
            img, c["src"], c["constraint"], c["ground_truth"], adapter="z", editor="zero", layer=1, keep_unreached=True
        )
        assert (v1.version, v1.editors, v1.num_edits, v1.live) == (1, ["zero"], 1, False)
        assert not v1.edits[0].checks[0].answered and c["base_answer"].startswith(v1.edits[0].checks[0].got)
        assert lens.promote(1, adapter="z").live
        assert v1.edits[0].editor == "zero" and v1.edits[0].layer == 1 and "zero.safetensors" in v1.files
        g = lens.generate(img, c["src"], adapter="z")
        assert g.served.version == 1 and g.text == c["base_answer"]  # a zero delta changes nothing
        v2 = lens.edit(
            img, c["rephrase"], c["constraint"], c["ground_truth"], adapter="z", editor="zero", keep_unreached=True
        )
        assert (v2.version, v2.parent, v2.num_edits) == (2, 1, 2)  # computed onto the live version's edit set
        lens.promote(2, adapter="z")
        assert [e.version for e in v2.edits] == [1, 2]
        with pytest.raises(sdk.InvalidArgumentError, match=r"unknown option\(s\) \['lam'\] for ZeroConfig"):
            lens.edit(img, c["src"], c["constraint"], c["ground_truth"], adapter="z", editor="zero", lam=0.1)
        assert len(lens.versions("z").versions) == 2  # nothing registered for the refused edit
        assert lens.rollback(adapter="z").version == 1
        assert lens.generate(img, c["src"], adapter="z").served.version == 1
        assert lens.rollback(adapter="z") is None
        assert lens.generate(img, c["src"], adapter="z").served.version == 0


def test_editors_say_their_capabilities_and_nothing_outside_an_editor_compares_its_name():
    """Capabilities live on ``EditorSpec`` (layer rule, trainer, PEFT export, gate): the modules outside
    ``editors/`` ask the spec, never compare an editor's name (an AST walk over the package's modules)."""
    import ast
    from pathlib import Path

    from diagnostics.recommend import LAYER_RULES
    from editors import trained_editor
    from editors.peft_export import not_exportable

    specs = {n: get_editor(n) for n in editor_names()}
    assert all(s.layer_rule in (None, *LAYER_RULES) for s in specs.values())
    assert trained_editor().name == "visedit" and trained_editor().trainer.config_class.__name__.endswith("Config")
    exporting = {n for n, s in specs.items() if s.peft_refusal is None}
    assert exporting == {"multedit", "alphaedit"}
    assert not_exportable("multedit") is None and "multedit or alphaedit" in not_exportable("keygate")
    assert specs["keygate"].gate == "key" and specs["multedit"].gate is None
    with pytest.raises(ValueError, match="gate must be one of"):
        EditorSpec("odd", ZeroConfig, ZeroEditSet, EditorBase, FORMAT, gate="sometimes")

    root = Path(__file__).resolve().parent.parent
    names = set(specs)
    found = []
    for package in ("server", "client", "bench", "diagnostics", "registry", "vlm"):
        for path in sorted((root / package).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Compare):
                    continue
                sides = [node.left, *node.comparators]
                consts = [c for s in sides for c in ([s] if isinstance(s, ast.Constant) else getattr(s, "elts", []))]
                hits = {c.value for c in consts if isinstance(c, ast.Constant) and c.value in names}
                if hits:
                    found.append(f"{path.relative_to(root)}:{node.lineno} compares {sorted(hits)}")
    assert not found, "modules outside editors/ branch on an editor's name:\n" + "\n".join(found)
