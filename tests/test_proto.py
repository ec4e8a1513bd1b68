"""The wire contract: committed stubs match editlens.proto, install as `editlens.v1`, and the SDK needs
nothing but them (no torch, no model code)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = ("editlens_pb2.py", "editlens_pb2.pyi", "editlens_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "proto"),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "editlens/v1/editlens.proto",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT / "proto",
    )
    assert res.returncode == 0, res.stderr
    for name in STUBS:
        fresh = (tmp_path / "editlens" / "v1" / name).read_text()
        assert fresh == (ROOT / "proto" / "editlens" / "v1" / name).read_text(), (
            f"{name} is stale: run bash proto/generate.sh"
        )


def test_stubs_import_as_editlens_v1_and_no_proto_package():
    import editlens.v1.editlens_pb2 as pb
    import editlens.v1.editlens_pb2_grpc as pb_grpc

    assert Path(pb.__file__).parent == Path(pb_grpc.__file__).parent
    assert pb.DESCRIPTOR.package == "editlens.v1"
    assert {m.name for m in pb.DESCRIPTOR.services_by_name["EditLens"].methods} >= {
        "Generate",
        "GenerateStream",
        "Edit",
        "TrainVisEdit",
        "ListVersions",
        "GetVersion",
        "SetAlias",
        "Rollback",
        "DeleteVersion",
        "Diagnose",
    }
    assert not (ROOT / "proto" / "__init__.py").exists()


def test_sdk_imports_only_the_stubs():
    code = (
        "import sys, client.sdk; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'vlm', 'server', 'editors', 'diagnostics', 'registry', 'mlflow', 'transformers'}); "
        "print(','.join(bad))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"the SDK imports {res.stdout.strip()}"


def test_the_options_messages_name_config_fields():
    """The server fills a config from an options message by field name, so every field must be one."""
    import dataclasses

    from editlens.v1 import editlens_pb2 as pb

    from editors import get_editor
    from editors.configs import VisEditTrainConfig

    for name in ("keygate", "alphaedit", "multedit", "visedit", "ft"):
        message = pb.EditRequest.DESCRIPTOR.fields_by_name[name].message_type
        config = {f.name for f in dataclasses.fields(get_editor(name).config_class)}
        assert {f.name for f in message.fields} <= config, name
    train = {f.name for f in pb.VisEditTrainOptions.DESCRIPTOR.fields}
    assert train <= {f.name for f in dataclasses.fields(VisEditTrainConfig)}


def test_the_diagnostic_enum_lists_the_diagnostics():
    from client.sdk import DIAGNOSTICS as SDK_NAMES
    from diagnostics.report import DIAGNOSTICS
    from server.convert import DIAGNOSTIC_NAMES

    assert sorted(DIAGNOSTIC_NAMES.values()) == sorted(DIAGNOSTICS) == sorted(SDK_NAMES)
