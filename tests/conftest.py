"""Shared fixtures: the real world model, built once per test session and cached.

The embedded default world (seed 0, the production recipe) is built into
$EDITLENS_HOME (default ~/.cache/editlens), so a second test run, the demo
command and later sessions reuse it; the build is keyed by its recipe and
rebuilds itself when the recipe changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


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
