"""The MLflow-backed adapter registry: real MLflow on sqlite in tmp folders, no mocks.

Every test gets its own copy of a migrated template database (``registry`` fixture in
conftest.py), so a test costs tens of milliseconds instead of a migration.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from registry import ConflictError, InvalidArgumentError, NotFoundError, Registry, RegistryError, VersionInfo


@pytest.fixture
def edit_file(tmp_path) -> Path:
    p = tmp_path / "in" / "multedit.safetensors"
    p.parent.mkdir()
    p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 4)
    return p


def make(reg: Registry, adapter: str, edit_file: Path, n: int = 1, **kw) -> list[VersionInfo]:
    out = []
    for _ in range(n):
        k = len(reg.versions(adapter)) if adapter in reg.adapters() else 0
        args = {
            "base_fingerprint": "fp-base",
            "editor": "multedit",
            "num_edits": k + 1,
            "parent": out[-1].version if out else None,
        }
        args.update(kw)
        out.append(
            reg.create_version(
                adapter, {"multedit.safetensors": edit_file}, {"edits": list(range(k + 1)), "note": "é"}, **args
            )
        )
    return out


def artifact_root(reg: Registry) -> Path:
    return reg.data_dir / "artifacts"


def test_create_list_get(registry, edit_file, tmp_path):
    png = tmp_path / "in" / "trace.png"
    png.write_bytes(b"\x89PNG fake")
    v1 = registry.create_version(
        "vqa-fix",
        {"multedit.safetensors": edit_file},
        {"edits": [{"id": 1}]},
        base_fingerprint="fp-base",
        editor="multedit",
        num_edits=1,
        parent=None,
        description="first",
    )
    v2 = registry.create_version(
        "vqa-fix",
        {"multedit.safetensors": edit_file, "visedit.safetensors": edit_file, "trace.png": png},
        {"edits": [{"id": 1}, {"id": 2}]},
        base_fingerprint="fp-base",
        editor="multedit+visedit",
        num_edits=2,
        parent=1,
    )
    assert (v1.version, v2.version) == (1, 2)
    assert v1.aliases == ["live"] and v2.aliases == ["live"]
    assert registry.adapters() == ["vqa-fix"]

    vs = registry.versions("vqa-fix")
    assert [v.version for v in vs] == [1, 2]
    assert vs[0].aliases == [] and vs[1].aliases == ["live"]
    assert vs[0].description == "first" and vs[0].parent is None and vs[1].parent == 2 - 1
    assert vs[1].editor == "multedit+visedit" and vs[1].num_edits == 2 and vs[1].base_fingerprint == "fp-base"
    assert vs[1].files == ["manifest.json", "multedit.safetensors", "trace.png", "visedit.safetensors"]
    assert vs[1].created >= vs[0].created > 1.6e9
    assert vs[0].manifest == {"edits": [{"id": 1}]}  # loaded lazily from the artifact store
    for ref in (1, "1", "v1", "V1"):
        assert registry.version("vqa-fix", ref).version == 1
    live = registry.version("vqa-fix", "live")
    assert live.version == 2 and live.manifest["edits"][1] == {"id": 2}
    assert registry.live("vqa-fix").version == 2 and registry.live_version_number("vqa-fix") == 2
    d = live.to_dict()
    assert d["version"] == 2 and d["manifest"] == live.manifest and json.dumps(d)

    # the artifacts live in this registry's own data_dir (not in the template's)
    stored = list(artifact_root(registry).rglob("visedit.safetensors"))
    assert len(stored) == 1 and stored[0].read_bytes() == edit_file.read_bytes()
    folder = registry.download("vqa-fix", 2)
    assert folder == registry.data_dir / "cache" / "vqa-fix" / "2"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == vs[1].files
    assert json.loads((folder / "manifest.json").read_text()) == live.manifest
    assert registry.download("vqa-fix", 2) == folder  # cached


def test_aliases_and_promote(registry, edit_file):
    make(registry, "a", edit_file, 1)
    v2 = registry.create_version(
        "a",
        {"multedit.safetensors": edit_file},
        {},
        base_fingerprint="fp-base",
        editor="multedit",
        num_edits=2,
        parent=1,
        set_live=False,
    )
    assert v2.aliases == [] and registry.live_version_number("a") == 1
    promoted = registry.set_alias("a", "live", 2)
    assert promoted.version == 2 and "live" in promoted.aliases
    assert registry.live_version_number("a") == 2
    registry.set_alias("a", "staging", 1)
    assert registry.version("a", "staging").version == 1
    assert {v.version: v.aliases for v in registry.versions("a")} == {1: ["staging"], 2: ["live"]}
    with pytest.raises(NotFoundError, match="no version 7"):
        registry.set_alias("a", "live", 7)
    for bad in ("latest", "v3", "3", "has space", ""):
        with pytest.raises(InvalidArgumentError):
            registry.set_alias("a", bad, 1)
    assert registry.live_version_number("a") == 2


def test_rollback_to_previous_live(registry, edit_file):
    make(registry, "a", edit_file, 3)  # live went 1 -> 2 -> 3
    registry.set_alias("a", "live", 1)  # 3 -> 1
    assert registry.rollback("a").version == 3  # undo: back to 3
    assert registry.rollback("a").version == 2
    assert registry.rollback("a").version == 1
    assert registry.live_version_number("a") == 1
    with pytest.raises(ConflictError, match="nothing to roll back"):
        registry.rollback("a")
    assert registry.live_version_number("a") == 1
    # the rule the service applies: the first version rolls back to no live version (the base model)
    assert registry.rollback("a", to_base=True) is None and registry.live_version_number("a") is None


def test_rollback_skips_deleted_and_falls_back_to_lower(registry, edit_file):
    make(registry, "a", edit_file, 3)  # history [1, 2], live 3
    registry.delete_version("a", 2)
    assert registry.rollback("a").version == 1  # 2 is gone
    # no history: next lower existing version
    make(registry, "b", edit_file, 1)
    registry.create_version(
        "b",
        {"multedit.safetensors": edit_file},
        {},
        base_fingerprint="fp-base",
        editor="multedit",
        num_edits=1,
        parent=None,
        set_live=False,
    )
    registry.create_version(
        "b",
        {"multedit.safetensors": edit_file},
        {},
        base_fingerprint="fp-base",
        editor="multedit",
        num_edits=1,
        parent=None,
        set_live=False,
    )
    registry.client.set_registered_model_alias("b", "live", "3")  # moved outside EditLens: no history
    assert registry.rollback("b").version == 2


def test_rollback_to_named_version(registry, edit_file):
    make(registry, "a", edit_file, 3)
    assert registry.rollback("a", to=1).version == 1
    assert registry.live_version_number("a") == 1
    assert registry.rollback("a", to="v2").version == 2
    registry.set_alias("a", "good", 3)
    assert registry.rollback("a", to="good").version == 3
    assert registry.rollback("a").version == 2  # the named rollbacks are in the history
    with pytest.raises(NotFoundError):
        registry.rollback("a", to=9)
    with pytest.raises(InvalidArgumentError):
        registry.rollback("a", to="not a ref")
    assert registry.live_version_number("a") == 2


def test_rollback_with_nothing_to_roll_back(registry, edit_file):
    make(registry, "a", edit_file, 1)
    with pytest.raises(ConflictError, match="nothing to roll back"):
        registry.rollback("a")
    registry.create_version(
        "b",
        {"multedit.safetensors": edit_file},
        {},
        base_fingerprint="fp-base",
        editor="multedit",
        num_edits=1,
        parent=None,
        set_live=False,
    )
    assert registry.live("b") is None and registry.live_version_number("b") is None
    with pytest.raises(ConflictError, match="no live version"):
        registry.rollback("b")


def test_delete_live_refused_other_deleted(registry, edit_file):
    make(registry, "a", edit_file, 2)
    with pytest.raises(ConflictError, match="live"):
        registry.delete_version("a", 2)
    registry.download("a", 1)
    registry.delete_version("a", 1)
    assert [v.version for v in registry.versions("a")] == [2]
    with pytest.raises(NotFoundError, match="no version 1"):
        registry.version("a", 1)
    assert not (registry.data_dir / "cache" / "a" / "1").exists()
    assert len(list(artifact_root(registry).rglob("multedit.safetensors"))) == 1  # its artifacts went too
    assert registry.live_version_number("a") == 2
    registry.delete_adapter("a")
    assert registry.adapters() == []
    with pytest.raises(NotFoundError):
        registry.versions("a")


def test_corrupted_or_missing_artifact_detected(registry, edit_file):
    make(registry, "a", edit_file, 1)
    good = registry.download("a", 1)
    (stored,) = artifact_root(registry).rglob("multedit.safetensors")
    stored.write_bytes(stored.read_bytes()[:-1] + b"X")
    registry.clear_cache()
    with pytest.raises(RegistryError, match="multedit.safetensors.*corrupted"):
        registry.download("a", 1)
    cache = registry.data_dir / "cache" / "a"
    assert not good.exists() and [p.name for p in cache.iterdir()] == []  # no half-downloaded folder
    stored.unlink()
    with pytest.raises(RegistryError, match="multedit.safetensors.*missing"):
        registry.download("a", 1)
    assert [p.name for p in cache.iterdir()] == []


def test_registry_check_finds_bad_versions_and_orphan_runs_and_repairs_them(registry, edit_file):
    from typer.testing import CliRunner

    from client.cli import app

    make(registry, "a", edit_file, 2)
    registry.download("a", 1)  # a verified cached copy must not hide a corrupted stored one
    orphan = registry.client.create_run(registry._experiment()).info.run_id  # a registration that died
    check = ["registry", "check", "--registry-dir", str(registry.data_dir), "--json"]
    found = json.loads(CliRunner().invoke(app, check).stdout)
    assert found["versions"] == 2 and not found["bad_versions"] and not found["bad_aliases"]
    assert [r["run_id"] for r in found["orphan_runs"]] == [orphan] and not found["deleted_runs"]
    young = json.loads(CliRunner().invoke(app, [*check, "--repair"]).stdout)
    assert not young["deleted_runs"], "an orphan younger than --grace may be a registration in flight"
    fixed = json.loads(CliRunner().invoke(app, [*check, "--repair", "--grace", "0"]).stdout)
    assert fixed["deleted_runs"] == [orphan]
    stored = sorted(artifact_root(registry).rglob("multedit.safetensors"))[0]
    stored.write_bytes(stored.read_bytes()[:-1] + b"X")
    bad = CliRunner().invoke(app, check[:-1])
    assert bad.exit_code == 1 and "bad: adapter a version" in bad.output and "corrupted" in bad.output
    assert json.loads(CliRunner().invoke(app, check).stdout)["orphan_runs"] == []


def test_corrupted_cached_copy_is_replaced(registry, edit_file):
    make(registry, "a", edit_file, 1)
    folder = registry.download("a", 1)
    (folder / "multedit.safetensors").write_bytes(b"garbage")
    again = registry.download("a", 1)
    assert (again / "multedit.safetensors").read_bytes() == edit_file.read_bytes()


def _state(reg: Registry, adapter: str):
    c = reg.client
    exp = c.get_experiment_by_name("editlens-adapters")
    runs = c.search_runs([exp.experiment_id]) if exp else []
    return (
        [v.version for v in reg.versions(adapter)] if adapter in reg.adapters() else None,
        reg.live_version_number(adapter) if adapter in reg.adapters() else None,
        len(runs),
    )


def test_create_is_all_or_nothing(registry, edit_file, tmp_path):
    missing = tmp_path / "in" / "nope.safetensors"
    # a new adapter: nothing at all is left behind
    with pytest.raises(InvalidArgumentError, match="nope"):
        registry.create_version(
            "fresh",
            {"multedit.safetensors": edit_file, "visedit.safetensors": missing},
            {},
            base_fingerprint="fp-base",
            editor="multedit+visedit",
            num_edits=2,
            parent=None,
        )
    assert registry.adapters() == []
    # a failure after the adapter was created (unknown parent): adapter removed again
    with pytest.raises(NotFoundError, match="no version 5"):
        make(registry, "fresh", edit_file, 1, parent=5)
    assert registry.adapters() == []

    make(registry, "a", edit_file, 2)
    before = _state(registry, "a")
    assert before == ([1, 2], 2, 2)
    with pytest.raises(InvalidArgumentError):
        make(registry, "a", edit_file.parent / "nope.safetensors", 1)
    assert _state(registry, "a") == before
    # an upload failure: the artifact store cannot be written (a file where its folder is)
    art = artifact_root(registry)
    art.rename(art.with_name("artifacts.moved"))
    art.write_text("not a folder")
    try:
        with pytest.raises(RegistryError):
            make(registry, "a", edit_file, 1)
    finally:
        art.unlink()
        art.with_name("artifacts.moved").rename(art)
    assert _state(registry, "a") == before  # no version, live unchanged, run deleted
    assert registry.rollback("a").version == 1  # history untouched
    assert make(registry, "a", edit_file, 1)[0].version == 3


def test_not_found(registry, edit_file):
    make(registry, "a", edit_file, 1)
    cases = [
        (lambda: registry.versions("nope"), "adapter 'nope' not found"),
        (lambda: registry.version("nope", 1), "adapter 'nope' not found"),
        (lambda: registry.version("nope", "live"), "adapter 'nope' not found"),
        (lambda: registry.version("a", 9), "adapter 'a' has no version 9"),
        (lambda: registry.version("a", "staging"), "adapter 'a' has no alias 'staging'"),
        (lambda: registry.live("nope"), "adapter 'nope' not found"),
        (lambda: registry.live_version_number("nope"), "adapter 'nope' not found"),
        (lambda: registry.download("a", 9), "no version 9"),
        (lambda: registry.delete_version("a", 9), "no version 9"),
        (lambda: registry.delete_adapter("nope"), "adapter 'nope' not found"),
        (lambda: registry.rollback("nope"), "adapter 'nope' not found"),
        (lambda: registry.set_alias("nope", "live", 1), "adapter 'nope' not found"),
    ]
    for fn, msg in cases:
        with pytest.raises(NotFoundError) as ei:
            fn()
        assert msg in str(ei.value)
        assert "Traceback" not in str(ei.value) and "\n" not in str(ei.value)


def test_invalid_arguments(registry, edit_file):
    for name in ("", "a/b", "a b", "..", ".hidden", "x" * 65, "a:b", 3, None):
        with pytest.raises(InvalidArgumentError):
            registry.versions(name)
    make(registry, "ok.name-1_x", edit_file, 1)
    for ref in (0, -1, True, "v0", "-1", "bad ref!", "latest", 1.5, None):
        with pytest.raises(InvalidArgumentError):
            registry.version("ok.name-1_x", ref)
    args = {"base_fingerprint": "fp-base", "editor": "multedit", "num_edits": 1, "parent": None}
    for files in (
        {},
        {"../x.safetensors": edit_file},
        {"manifest.json": edit_file},
        {"model.pkl": edit_file},
        {"trace.png": edit_file},
    ):
        with pytest.raises(InvalidArgumentError):
            registry.create_version("b", files, {}, **args)
    with pytest.raises(InvalidArgumentError, match="manifest"):
        registry.create_version("b", {"e.safetensors": edit_file}, {"x": object()}, **args)
    with pytest.raises(InvalidArgumentError, match="num_edits"):
        registry.create_version("b", {"e.safetensors": edit_file}, {}, **{**args, "num_edits": -1})
    assert registry.adapters() == ["ok.name-1_x"]


def test_conflicts_with_other_models(registry, edit_file):
    make(registry, "a", edit_file, 1)
    with pytest.raises(ConflictError, match="base model"):
        make(registry, "a", edit_file, 1, base_fingerprint="another-model")
    registry.client.create_registered_model("someone-elses")
    with pytest.raises(ConflictError, match="not an EditLens adapter"):
        make(registry, "someone-elses", edit_file, 1)
    with pytest.raises(ConflictError):
        registry.delete_adapter("someone-elses")
    assert registry.adapters() == ["a"]


def test_replica_follows_alias(registry, edit_file):
    make(registry, "a", edit_file, 2)
    replica = Registry(data_dir=registry.data_dir)
    assert replica.live_version_number("a") == 2
    registry.rollback("a")
    assert replica.live_version_number("a") == 1  # the registry keeps no cache: every read asks MLflow
    registry.set_alias("a", "live", 2)
    assert replica.live("a").version == 2
    registry.rollback("a")
    assert replica.live_version_number("a") == 1
    replica.set_alias("a", "live", 2)
    assert registry.live_version_number("a") == 2
    assert registry.rollback("a").version == 1  # the history is shared through MLflow


def test_a_version_built_on_a_live_version_that_moved_is_refused_and_leaves_nothing(registry, edit_file):
    """Two replicas edit one adapter at once, both on version 1: the first to register makes version 2 live;
    the second, still on version 1, is refused (StaleParentError) instead of hiding version 2's edit."""
    from registry import StaleParentError

    make(registry, "a", edit_file, 1)
    replica = Registry(data_dir=registry.data_dir)
    args = {"base_fingerprint": "fp-base", "editor": "multedit", "num_edits": 2, "parent": 1}
    files, manifest = {"multedit.safetensors": edit_file}, {"edits": [0, 1]}
    v2 = replica.create_version("a", files, manifest, parent_must_be_live=True, **args)
    assert v2.version == 2 and registry.live_version_number("a") == 2
    with pytest.raises(StaleParentError, match="version 2 became live while this version was being made on version 1"):
        registry.create_version("a", files, manifest, parent_must_be_live=True, **args)
    assert [v.version for v in registry.versions("a")] == [1, 2] and registry.live_version_number("a") == 2
    v3 = registry.create_version("a", files, manifest, parent_must_be_live=True, **{**args, "parent": 2})
    assert registry.live_version_number("a") == v3.version > 2  # the retry, on the new live version
    registry.create_version("a", files, manifest, **args)  # without the check: the old behaviour
    with pytest.raises(StaleParentError, match="made on the base model"):  # a first version raced by another
        registry.create_version("b", files, manifest, parent_must_be_live=True, **{**args, "parent": None})
        registry.create_version("b", files, manifest, parent_must_be_live=True, **{**args, "parent": None})


def test_threads_read_live_while_a_job_creates_versions(registry, edit_file):
    make(registry, "a", edit_file, 1)
    errors: list[BaseException] = []
    seen: list[list[int]] = [[] for _ in range(4)]
    done = threading.Event()

    def reader(i):
        try:
            while not done.is_set():
                seen[i].append(registry.live_version_number("a"))
                if i == 0:
                    registry.versions("a")
        except BaseException as e:
            errors.append(e)

    def writer():
        try:
            make(registry, "a", edit_file, 4)
            registry.rollback("a")
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert registry.live_version_number("a") == 4
    for s in seen:
        assert s and set(s) <= {1, 2, 3, 4, 5}


def test_concurrent_writers_get_distinct_versions(registry, edit_file):
    make(registry, "a", edit_file, 1)
    errors: list[BaseException] = []
    made: list[int] = []

    def writer():
        try:
            for _ in range(3):
                made.append(
                    registry.create_version(
                        "a",
                        {"multedit.safetensors": edit_file},
                        {},
                        base_fingerprint="fp-base",
                        editor="multedit",
                        num_edits=1,
                        parent=1,
                    ).version
                )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(made) == [2, 3, 4, 5, 6, 7]
    assert [v.version for v in registry.versions("a")] == [1, 2, 3, 4, 5, 6, 7]
    assert registry.live_version_number("a") == 7  # writes are serialised


def test_template_copy_is_independent(registry, registry_template, edit_file):
    make(registry, "a", edit_file, 1)
    assert not (registry_template / "artifacts").exists()
    assert Registry(data_dir=registry_template).adapters() == []
    exp = registry.client.get_experiment_by_name("editlens-adapters")
    assert exp.artifact_location == (registry.data_dir / "artifacts").as_uri()


def test_import_is_lazy():
    import subprocess
    import sys

    code = "import sys, registry; assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
