"""The shape of the code: no function outside the tests is longer than ``MAX_LINES`` lines (issue 27 item 6).

A long function is split along its phases (a bench's run reads as its phases, ``bench/harness.py`` holds
what the benches share); the count is ``end_lineno - lineno + 1`` of every function and method, nested ones
included, over every ``.py`` file of the checkout except the tests, virtual environments, build folders and
the generated protobuf stubs (``*_pb2*.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 120
SKIPPED_DIRS = {"tests", "build", "dist", "node_modules", "__pycache__", "venv"}


def _skipped(rel: Path) -> bool:
    """Tests, hidden folders (.venv, .git, caches), build folders and egg-info, and the generated stubs."""
    dirs = rel.parts[:-1]
    if any(d in SKIPPED_DIRS or d.startswith(".") or d.endswith(".egg-info") for d in dirs):
        return True
    return "_pb2" in rel.name


def source_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not _skipped(p.relative_to(root)))


def long_functions(path: Path, limit: int = MAX_LINES) -> list[str]:
    """``file:line name (N lines)`` for every function of ``path`` longer than ``limit`` lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                out.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_the_walk_sees_the_code_and_not_the_rest():
    files = {p.relative_to(ROOT).as_posix() for p in source_files()}
    assert {"bench/harness.py", "vlm/world/build.py", "editors/visedit/data.py"} <= files
    assert not any(f.startswith(("tests/", ".venv/")) or "_pb2" in f for f in files)


def test_a_long_function_is_named(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    src = tmp_path / "long.py"
    src.write_text(f"def short():\n    return 1\n\n\ndef too_long():\n{body}\n    return 0\n")
    assert long_functions(src) == [f"{src}:5 too_long ({MAX_LINES + 2} lines)"]


def test_no_function_outside_the_tests_is_over_120_lines():
    too_long = [f for path in source_files() for f in long_functions(path)]
    assert not too_long, f"functions over {MAX_LINES} lines (split them along their phases):\n" + "\n".join(too_long)
