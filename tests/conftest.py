"""Shared fixtures: the real world model, built once per test session and cached.

The embedded default world (seed 0, the production recipe) is built into
$EDITLENS_HOME (default ~/.cache/editlens), so a second test run, the demo
command and later sessions reuse it; the build is keyed by its recipe and
rebuilds itself when the recipe changes.

The suite runs on several processes (pytest-xdist, ``-n auto`` in
pyproject.toml, whole files per process). The world is built before the
workers start, by the controlling process with every core (as `editlens
serve` builds it), so no two processes build it and nothing competes with
the build; each worker then uses its share of the cores for torch (and for
the servers it starts as subprocesses), so the processes never oversubscribe
the machine (OpenMP threads that outnumber the cores slow everything down
many times over).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from registry import quiet_mlflow

quiet_mlflow()  # as the editlens command does: no telemetry, no progress bars, fast failures

if os.environ.get("PYTEST_XDIST_WORKER"):  # an xdist worker: its share of the cores, set before torch loads
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_share)


def pytest_report_header(config):
    """The arithmetic this run computes with: the numerics pass of .ci/run (docs/development.md) runs on other
    CPU kernels and another thread count than the first pass, and its log says so."""
    import torch

    workers = getattr(config.option, "numprocesses", None)
    threads = f"{torch.get_num_threads()} (this process)"
    if workers:
        threads = "each worker its share of the cores (OMP_NUM_THREADS)"
    return (
        f"arithmetic: torch {torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()}, "
        f"MKL_CBWR={os.environ.get('MKL_CBWR', 'unset')}, intra-op threads: {threads}"
    )


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    elif getattr(config.option, "numprocesses", None) and not config.option.collectonly:
        from vlm.world import build_world

        build_world(seed=0, stage=lambda m: print(f"[world build] {m}", flush=True))


@pytest.fixture(scope="session")
def world_summary():
    from vlm.world import build_world

    return build_world(seed=0, stage=lambda m: print(f"[world build] {m}", flush=True))


@pytest.fixture(scope="session")
def world_dir(world_summary) -> Path:
    return Path(world_summary["path"])


@pytest.fixture(scope="session")
def vlm(world_dir):
    from vlm import load_vlm

    return load_vlm(world_dir / "model", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def test_cases(world_dir):
    return json.loads((world_dir / "edit_cases" / "test.json").read_text())


# --- registry (MLflow on sqlite) ---------------------------------------------------------------
# Creating an MLflow sqlite database runs its migrations (seconds), so one empty migrated
# database is made per session and every test gets a copy of it in its own tmp_path. The copy
# holds no experiment yet: a Registry creates "editlens-adapters" on its first create_version
# with the artifact location of its own data_dir, so nothing points into the template.


@pytest.fixture(scope="session")
def registry_template(tmp_path_factory) -> Path:
    """Folder holding a migrated, empty MLflow database (mlflow.db)."""
    from registry import Registry

    folder = tmp_path_factory.mktemp("registry-template")
    Registry(data_dir=folder).check()
    return folder


@pytest.fixture
def registry_dir(registry_template, tmp_path):
    """A registry folder holding a private copy of the template database (for subprocess servers)."""
    from registry import copy_database

    folder = tmp_path / "registry"
    copy_database(registry_template / "mlflow.db", folder / "mlflow.db")
    return folder


@pytest.fixture
def registry(registry_template, tmp_path):
    """A Registry on a private copy of the template database (data_dir = tmp_path/registry)."""
    from registry import Registry, copy_database

    data_dir = tmp_path / "registry"
    copy_database(registry_template / "mlflow.db", data_dir / "mlflow.db")
    return Registry(data_dir=data_dir)


# --- the gRPC service (server/, client/sdk.py) -------------------------------------------------
# In-process servers on 127.0.0.1, port 0, serving the session's model with a registry copied from
# the template: starting one costs milliseconds, so tests start their own when they need another
# configuration. Subprocess servers (`editlens serve`) are started only by the end-to-end tests.


class RunningService:
    def __init__(self, server, registry, data_dir):
        self.server, self.registry, self.data_dir = server, registry, data_dir
        self.service = server.service
        self.address = server.address

    def client(self, token=None, **kw):
        from client.sdk import EditLensClient

        return EditLensClient(self.address, token=token, **kw)


@pytest.fixture(scope="session")
def start_service(vlm, registry_template, tmp_path_factory):
    """start_service(token=None, data_dir=None, **ServerConfig fields) -> RunningService (stopped at the end
    of the session). ``data_dir``: reuse a registry folder (a restart); default: a fresh copy of the template."""
    from registry import Registry, copy_database
    from server.app import EditLensServer
    from server.config import ServerConfig

    started = []

    def start(token=None, data_dir=None, model_vlm="session", **config):
        if data_dir is None:
            data_dir = tmp_path_factory.mktemp("service-registry")
            copy_database(registry_template / "mlflow.db", data_dir / "mlflow.db")
        registry = Registry(data_dir=data_dir)
        server = EditLensServer(
            ServerConfig(port=0, token=token, **config),
            vlm=vlm if model_vlm == "session" else model_vlm,
            registry=registry,
        )
        server.start()
        started.append(server)
        if model_vlm is not None:
            assert server.wait_ready(60), server.service.state_detail
        return RunningService(server, registry, data_dir)

    yield start
    for s in started:
        s.stop(0)


def _generalising_insertion_case(vlm, world_dir, test_cases, make_editor, name: str) -> dict:
    """The first insertion case (an entity the model never saw, whose `pred` differs from `ground_truth`) whose
    edit by ``make_editor()`` (answer = ground_truth) generalises: afterwards the question, its rephrase and
    another rendering of the image are answered with the ground truth and the modal-locality question keeps its
    answer. Chosen by that property at run time, whatever world the recipe built and whatever the machine's
    arithmetic makes of the optimisation; the test fails with a message saying so if no case has it."""
    from diagnostics.cases import world_phrases
    from editors.attach import attach
    from editors.request import EditRequest
    from vlm import encode, generate

    def ask(q, img):
        return generate(vlm, [encode(vlm.processor, q, image=world_dir / img)])[0]

    cands = [c for c in test_cases if c["type"] == "insertion" and c["pred"] != c["ground_truth"]]
    for c in cands:
        before = ask(c["m_loc_q"], c["m_loc"])
        req = EditRequest(
            c["src"],
            c["constraint"],
            c["ground_truth"],
            image=world_dir / c["image"],
            replacements=world_phrases(world_dir),
        )
        edit = make_editor().edit_sequentially([req])
        with attach(vlm, edit):
            got = [
                ask(c["src"], c["image"]),
                ask(c["rephrase"], c["image"]),
                ask(c["src"], c["image_rephrase"]),
                ask(c["m_loc_q"], c["m_loc"]),
            ]
        if got == [c["ground_truth"]] * 3 + [before]:
            return dict(c, base_answer=ask(c["src"], c["image"]), m_loc_answer=before)
    pytest.fail(f"none of {len(cands)} insertion cases generalises to its other rendering after a {name} edit")


@pytest.fixture(scope="session")
def insertion_case(vlm, world_dir, test_cases):
    """An insertion case whose MultEdit edit (layer 0) generalises (about half of them do; the rest miss the
    other rendering). For tests that edit with MultEdit."""
    from editors.multedit import MultEdit, MultEditConfig

    return _generalising_insertion_case(
        vlm, world_dir, test_cases, lambda: MultEdit(vlm, MultEditConfig(layer=0)), "MultEdit"
    )


@pytest.fixture(scope="session")
def keygate_case(vlm, world_dir, test_cases):
    """An insertion case whose edit by KeyGate (the SDK's and the CLI's default editor; its default settings,
    layer 0) generalises, for tests that edit through the service with the default editor (fewer cases do than
    for MultEdit: KeyGate's modal generality is its known weakness)."""
    from editors import get_editor

    spec = get_editor("keygate")
    return _generalising_insertion_case(
        vlm, world_dir, test_cases, lambda: spec.create(vlm, spec.config(vlm, layer=0)), "KeyGate"
    )
