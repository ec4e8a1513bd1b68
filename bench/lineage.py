"""``editlens bench lineage``: a lineage of versions built one Edit RPC at a time, as a user who keeps fixing facts.

An in-process EditLens server (real gRPC on 127.0.0.1, a real MLflow registry on
sqlite in a temporary folder) serves the world's model; the SDK sends the
world's edit stream (``vlm.world.stream``) as Edit calls on one adapter, each
building on the live version and registering the next one. Printed:

* the latency of the Edit call (the job: key, value, update, registration of
  the version; what the caller waits for) at each mark (1, 100, 1000, ...: the
  mean of the calls since the previous mark) and for one fixed probe edit made
  on the base model and on the last version with ``no_promote`` (equal work);
* the bytes the registry stores for the lineage at each mark
  (``registry_bytes``, every file of every version; ``registry_bytes_per_edit``):
  flat per edit with delta versions (``server.bundles``), growing with the
  lineage when every version is stored whole;
* Generate latency with all the edits live against the base model (the same
  request, round-robin, in one server thread each);
* a rollback from the last version to the one in the middle, and the first
  answer served by it (its bundle cold: downloaded, validated, loaded).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .harness import (
    in_thread,
    latencies,
    marks_up_to,
    median_ratio,
    ms,
    open_registry,
    scratch,
    service,
    since_mark,
    stream_with_probe,
)

MARKS = (1, 10, 100, 200, 500, 1000)
ADAPTER = "lineage"


def _edit(lens, world_dir: Path, rec: dict, adapter: str, editor: str, layer: int, promote: bool = True):
    """The Edit call of one fact of the stream on ``adapter`` (kept when it misses its answer)."""
    return lens.edit(
        world_dir / rec["image"],
        rec["src"],
        rec["constraint"],
        rec["alt"],
        adapter=adapter,
        editor=editor,
        layer=layer,
        promote=promote,
        keep_unreached=True,  # the lineage grows by every edit; one that misses its answer is counted below
    )


def _edit_calls(
    lens, world_dir, records, editor, layer, marks, rows: list, stage, tick, stored: Callable[[], int]
) -> tuple[Any, int]:
    """Every fact as an Edit call on the live version, the mean latency since the previous mark and the bytes the
    registry holds (``stored()``) appended to ``rows`` at each mark; returns the last call's answer and how many
    versions missed their own answer."""
    edits = len(records)
    times: list[float] = []
    last, unreached = None, 0
    for i, rec in enumerate(records):
        t0 = time.perf_counter()
        last = _edit(lens, world_dir, rec, ADAPTER, editor, layer)
        times.append(time.perf_counter() - t0)
        if not last.live:  # it missed its own answer: registered, not live; made live (untimed)
            unreached += 1
            lens.promote(last.version, adapter=ADAPTER)
        if tick:
            tick(i + 1, edits)
        if i + 1 in marks:
            since = since_mark(times, i + 1, rows[-1]["live_edits"] if rows else 0)
            size = stored()
            rows.append(
                {
                    "live_edits": i + 1,
                    "version": last.version,
                    "mean_ms": ms(statistics.fmean(since)),
                    "registry_bytes": size,
                    "registry_bytes_per_edit": round(size / (i + 1)),
                }
            )
            stage(f"after {i + 1} edits: {rows[-1]['mean_ms']} ms per Edit call, {size / 1e6:.2f} MB stored")
    return last, unreached


def _probe_edits(lens, world_dir, probe, editor, layer, edits: int) -> dict[str, float]:
    """The probe edit on the base model and on the last version, neither promoted (equal work)."""

    def probe_call(onto_base: bool) -> float:
        t0 = time.perf_counter()
        _edit(lens, world_dir, probe, "probe" if onto_base else ADAPTER, editor, layer, promote=False)
        return time.perf_counter() - t0

    out = {"no_live_edits": ms(probe_call(True)), f"{edits}_live_edits": ms(probe_call(False))}
    out["ratio"] = round(out[f"{edits}_live_edits"] / out["no_live_edits"], 3)
    return out


def _rollback(svc, registry, world_dir, first: dict, last_version: int, stage) -> dict[str, Any]:
    """A rollback from the last version to the middle one, its bundle cold, and the first answer it serves."""
    server, lens = svc.server, svc.lens
    middle = max(1, last_version // 2)
    stage(f"rollback from version {last_version} to {middle}")
    server.unload_version(ADAPTER, middle)
    registry.clear_cache(ADAPTER, middle)
    t0 = time.perf_counter()
    lens.rollback(adapter=ADAPTER, to=middle)
    t_roll = time.perf_counter() - t0
    g = lens.generate(world_dir / first["image"], first["src"], adapter=ADAPTER)
    t_first = time.perf_counter() - t0
    return {
        "from_version": last_version,
        "to_version": middle,
        "served_version": g.served.version,
        "rollback_call_ms": ms(t_roll),
        "rollback_and_first_answer_ms": ms(t_first),
        "first_answer": g.text,
        "expected_answer": first["alt"],
    }


def run(
    vlm,
    world_dir: Path,
    edits: int = 1000,
    editor: str = "keygate",
    layer: int = 0,
    requests: int = 30,
    stage: Callable[[str], None] = lambda m: None,
    tick: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The lineage benchmark (module docstring); returns a JSON-ready dict."""
    if edits < 2 or requests < 1:
        raise ValueError("--edits must be at least 2 and --requests at least 1")
    world_dir = Path(world_dir)
    records, probe = stream_with_probe(world_dir, edits)
    marks = marks_up_to(MARKS, edits)
    result: dict[str, Any] = {"editor": editor, "edits": edits, "layer": layer, "edit_ms": []}

    with scratch("lineage") as tmp:
        registry = open_registry(tmp)
        with service(vlm, registry) as svc:
            lens = svc.lens
            stage(f"{edits} Edit calls on one adapter, each on the live version")
            last, unreached = _edit_calls(
                lens,
                world_dir,
                records,
                editor,
                layer,
                marks,
                result["edit_ms"],
                stage,
                tick,
                lambda: registry.stored_bytes(ADAPTER),
            )
            result["unreached_edits"] = unreached  # Edit calls whose version missed its own answer
            stage("the probe edit on the base model and on the last version (not promoted)")
            result["probe_edit_ms"] = _probe_edits(lens, world_dir, probe, editor, layer, edits)
            stage(f"Generate latency, {requests} requests per row")
            img, q = world_dir / records[0]["image"], records[0]["src"]
            fns = {
                "base model": lambda: lens.generate(img, q, base=True),
                f"{edits} live edits": lambda: lens.generate(img, q, adapter=ADAPTER),
            }
            gen = in_thread(lambda: latencies(fns, requests))
            gen["ratio_median"] = median_ratio(gen, f"{edits} live edits", "base model")
            result["generate"] = gen
            result["rollback"] = _rollback(svc, registry, world_dir, records[0], last.version, stage)
    return result
