"""``editlens bench lineage``: a lineage of versions built one Edit RPC at a time, as a user who keeps fixing facts.

An in-process EditLens server (real gRPC on 127.0.0.1, a real MLflow registry on
sqlite in a temporary folder) serves the world's model; the SDK sends the
world's edit stream (``vlm.world.stream``) as Edit calls on one adapter, each
building on the live version and registering the next one. Printed:

* the latency of the Edit call (the job: key, value, update, registration of
  the version; what the caller waits for) at each mark (1, 100, 1000, ...: the
  mean of the calls since the previous mark) and for one fixed probe edit made
  on the base model and on the last version with ``no_promote`` (equal work);
* Generate latency with all the edits live against the base model (the same
  request, round-robin, in one server thread each);
* a rollback from the last version to the one in the middle, and the first
  answer served by it (its bundle cold: downloaded, validated, loaded).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlm.world.stream import edit_stream, load_world, render_stream_images

MARKS = (1, 10, 100, 200, 500, 1000)


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


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
    from bench.serve import in_thread, latencies
    from client.sdk import EditLensClient
    from registry import Registry
    from server.app import EditLensServer
    from server.config import ServerConfig

    if edits < 2 or requests < 1:
        raise ValueError("--edits must be at least 2 and --requests at least 1")
    world_dir = Path(world_dir)
    records = edit_stream(load_world(world_dir), edits + 1)
    render_stream_images(world_dir, records)
    probe, records = records[-1], records[:-1]
    marks = sorted({m for m in MARKS if m <= edits} | {edits})
    result: dict[str, Any] = {"editor": editor, "edits": edits, "layer": layer, "edit_ms": []}
    adapter = "lineage"

    def edit(lens, rec, promote=True):
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

    with tempfile.TemporaryDirectory(prefix="editlens-bench-lineage-") as tmp:
        registry = Registry(data_dir=Path(tmp) / "registry")
        server = EditLensServer(ServerConfig(port=0), vlm=vlm, registry=registry)
        address = server.start()
        server.wait_ready(120)
        try:
            with EditLensClient(address) as lens:
                stage(f"{edits} Edit calls on one adapter, each on the live version")
                times: list[float] = []
                last, unreached = None, 0
                for i, rec in enumerate(records):
                    t0 = time.perf_counter()
                    last = edit(lens, rec)
                    times.append(time.perf_counter() - t0)
                    if not last.live:  # it missed its own answer: registered, not live; made live (untimed)
                        unreached += 1
                        lens.promote(last.version, adapter=adapter)
                    if tick:
                        tick(i + 1, edits)
                    if i + 1 in marks:
                        since = times[-(i + 1 - (result["edit_ms"][-1]["live_edits"] if result["edit_ms"] else 0)) :]
                        result["edit_ms"].append(
                            {"live_edits": i + 1, "version": last.version, "mean_ms": _ms(statistics.fmean(since))}
                        )
                        stage(f"after {i + 1} edits: {result['edit_ms'][-1]['mean_ms']} ms per Edit call")
                result["unreached_edits"] = unreached  # Edit calls whose version missed its own answer
                stage("the probe edit on the base model and on the last version (not promoted)")
                probe_lens = lens

                def probe_call(onto_base: bool) -> float:
                    t0 = time.perf_counter()
                    probe_lens.edit(
                        world_dir / probe["image"],
                        probe["src"],
                        probe["constraint"],
                        probe["alt"],
                        adapter="probe" if onto_base else adapter,
                        editor=editor,
                        layer=layer,
                        promote=False,
                        keep_unreached=True,
                    )
                    return time.perf_counter() - t0

                result["probe_edit_ms"] = {
                    "no_live_edits": _ms(probe_call(True)),
                    f"{edits}_live_edits": _ms(probe_call(False)),
                }
                result["probe_edit_ms"]["ratio"] = round(
                    result["probe_edit_ms"][f"{edits}_live_edits"] / result["probe_edit_ms"]["no_live_edits"], 3
                )
                stage(f"Generate latency, {requests} requests per row")
                img, q = world_dir / records[0]["image"], records[0]["src"]
                fns = {
                    "base model": lambda: lens.generate(img, q, base=True),
                    f"{edits} live edits": lambda: lens.generate(img, q, adapter=adapter),
                }
                gen = in_thread(lambda: latencies(fns, requests))
                gen["ratio_median"] = round(gen[f"{edits} live edits"]["median_ms"] / gen["base model"]["median_ms"], 3)
                result["generate"] = gen
                middle = max(1, last.version // 2)
                stage(f"rollback from version {last.version} to {middle}")
                server.unload_version(adapter, middle)
                registry.clear_cache(adapter, middle)
                t0 = time.perf_counter()
                lens.rollback(adapter=adapter, to=middle)
                t_roll = time.perf_counter() - t0
                g = lens.generate(world_dir / records[0]["image"], records[0]["src"], adapter=adapter)
                t_first = time.perf_counter() - t0
                result["rollback"] = {
                    "from_version": last.version,
                    "to_version": middle,
                    "served_version": g.served.version,
                    "rollback_call_ms": _ms(t_roll),
                    "rollback_and_first_answer_ms": _ms(t_first),
                    "first_answer": g.text,
                    "expected_answer": records[0]["alt"],
                }
        finally:
            server.stop(0)
    return result
