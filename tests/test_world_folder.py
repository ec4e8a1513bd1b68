"""One world folder's layout (``vlm.world.folder.WorldFolder``), the rule for "is this model the world's model",
and the one home-folder rule (``vlm.home``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlm.home import editlens_home, registry_dir, shapes_dir, statistics_dir, worlds_dir
from vlm.world.folder import EDIT_SPLITS, QUESTION_SETS, WorldFolder, WorldFolderError, default_world_dir


def test_layout_round_trip_on_the_built_world(world_dir, world_summary):
    world = WorldFolder(world_dir)
    assert world.is_world(world_dir) and world.is_built()
    assert world.built_summary()["fingerprint"] == world_summary["fingerprint"]
    for path in (world.model_dir / "config.json", world.images_dir, world.world_json, world.summary_json):
        assert path.exists(), path
    spec = world.spec()
    assert spec == json.loads(world.world_json.read_text())
    assert world.spec() is spec  # parsed once per folder object
    assert world.config() == spec["config"] and json.loads(json.dumps(world.world().to_dict())) == spec
    for split in EDIT_SPLITS:
        assert len(world.edit_cases(split)) == world_summary["counts"][f"edit_cases_{split}"]
    for name in QUESTION_SETS:
        assert world.questions(name) and world.questions_file(name).parent == world.questions_dir
    case = world.edit_cases("test")[0]
    assert world.image(case["image"]).is_file()
    names = {e["name"] for e in spec["entities"] + spec["text_only_entities"]}
    assert set(world.phrases()) == names | {f"the {n}" for n in names}
    assert WorldFolder.containing(world.edit_cases_file("test")) == world
    assert WorldFolder.containing(world.root) == world
    assert world.visedit_adapter.parent.parent == world.root
    from diagnostics.cases import world_phrases

    assert world_phrases(world.edit_cases_file("test")) == world.phrases()
    assert os.fspath(world) == str(world) == str(world_dir)


def test_the_worlds_own_model_is_recognised(world_dir, world_summary):
    world = WorldFolder(world_dir)
    assert WorldFolder.of_model(world.model_dir) == world  # fingerprint computed from the folder
    served = SimpleNamespace(path=world.model_dir, fingerprint=world_summary["fingerprint"])  # a loaded VLM's view
    assert WorldFolder.of_model(served) == world
    from editors.preservation import default_prompt_file

    assert default_prompt_file(served) == world.questions_file("train")


def _checkpoint(folder: Path, scale: float) -> Path:
    """A save_pretrained-shaped folder with its own weights (``fingerprint_folder`` reads config and weights)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llava", "note": "a real checkpoint"}))
    save_file({"w": torch.full((4, 4), scale)}, str(folder / "model.safetensors"))
    return folder


def test_a_checkpoint_beside_a_world_json_is_not_taken_for_a_world(world_dir, tmp_path):
    from vlm.loading import fingerprint_folder

    world = WorldFolder(world_dir)
    parent = tmp_path / "checkpoints"
    model = _checkpoint(parent / "model", 1.0)
    shutil.copy(world.world_json, parent / "world.json")
    assert WorldFolder.is_world(parent)  # a world.json is there ...
    assert WorldFolder.of_model(model) is None  # ... but no summary records this model
    shutil.copy(world.summary_json, parent / "summary.json")  # even the world's own summary and edit cases:
    shutil.copytree(world.edit_cases_dir, parent / "edit_cases")
    assert WorldFolder.of_model(model) is None  # its fingerprint is not this model's
    loaded = SimpleNamespace(path=model, fingerprint=fingerprint_folder(model))
    assert WorldFolder.of_model(loaded) is None
    other = _checkpoint(parent / "llava-7b", 2.0)  # any folder name other than the world's model/
    assert WorldFolder.of_model(other) is None
    from editors.preservation import default_prompt_file

    assert default_prompt_file(loaded) is None  # no statistics from an unrelated world's questions


def test_a_copy_of_the_worlds_model_in_a_copied_world_is_that_world(world_dir, tmp_path):
    """The rule is the fingerprint the build recorded, not the folder's location."""
    world = WorldFolder(world_dir)
    copy = tmp_path / "copy"
    (copy / "model").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        os.symlink(world.model_dir / name, copy / "model" / name)
    for name in ("world.json", "summary.json"):
        os.symlink(world.root / name, copy / name)
    assert WorldFolder.of_model(copy / "model") == WorldFolder(copy)


def test_server_host_asks_once_and_refuses_training_without_a_world(tmp_path):
    from editlens.v1 import editlens_pb2 as pb

    from server.editing import plan_training
    from server.errors import ServiceError

    model = _checkpoint(tmp_path / "model", 3.0)
    host = SimpleNamespace(
        vlm=SimpleNamespace(path=model, num_layers=2),
        versions=SimpleNamespace(adapter_name=lambda a: a),
        world=WorldFolder.of_model(SimpleNamespace(path=model, fingerprint="x")),
    )
    assert host.world is None
    with pytest.raises(ServiceError, match="not a world's model.*cases_path"):
        plan_training(host, pb.TrainVisEditRequest())
    with pytest.raises(ServiceError, match="is not a world folder"):
        plan_training(host, pb.TrainVisEditRequest(cases_path=str(tmp_path)))


def test_a_folder_that_is_no_world_says_what_to_do(tmp_path):
    empty = WorldFolder(tmp_path)
    assert not empty.is_world(tmp_path) and not empty.is_built() and empty.built_summary() is None
    assert WorldFolder.containing(tmp_path / "edit_cases" / "test.json") is None
    for read in (empty.spec, empty.edit_cases, empty.questions, empty.phrases):
        with pytest.raises(WorldFolderError, match="editlens world build"):
            read()
    with pytest.raises(WorldFolderError, match=r"holds no built world \(no world.json, model/config.json"):
        empty.require()
    (tmp_path / "world.json").write_text("{not json")
    with pytest.raises(WorldFolderError, match="cannot read"):
        WorldFolder(tmp_path).spec()
    from vlm.world.stream import load_world

    with pytest.raises(WorldFolderError):
        load_world(tmp_path)


def test_the_home_rule_honours_editlens_home(monkeypatch, tmp_path):
    from editors.preservation import statistics_path
    from registry import default_data_dir

    monkeypatch.setenv("EDITLENS_HOME", str(tmp_path / "home"))
    home = tmp_path / "home"
    assert editlens_home() == home
    assert worlds_dir() == home / "worlds" and default_world_dir(3) == home / "worlds" / "seed-3"
    assert default_world_dir(0, "qwen2_vl") == home / "worlds" / "seed-0-qwen2_vl"
    assert WorldFolder.default(2).root == home / "worlds" / "seed-2"
    assert registry_dir() == default_data_dir() == home / "registry"  # the registry's restatement agrees
    assert statistics_dir() == home / "statistics" and shapes_dir() == home / "shapes"
    readonly = SimpleNamespace(path=tmp_path / "no-such-model", fingerprint="f" * 32)
    assert statistics_path(readonly, 1) == home / "statistics" / ("f" * 32) / "layer-1.safetensors"
    from vlm.world import editlens_home as reexported

    assert reexported() == home
    monkeypatch.setenv("EDITLENS_HOME", "~/elsewhere")
    assert editlens_home() == Path.home() / "elsewhere"
    for unset in (lambda: monkeypatch.delenv("EDITLENS_HOME"), lambda: monkeypatch.setenv("EDITLENS_HOME", "")):
        unset()
        assert editlens_home() == Path.home() / ".cache" / "editlens" == default_data_dir().parent
