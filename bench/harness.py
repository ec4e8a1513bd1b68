"""What the benches share: their progress callbacks, the run's header, the edit stream with its probe fact,
the marks, timing, and a real service to time things through.

* Progress: ``sayer(stage)`` (a message per phase, silent when not given) and the header every model bench's
  JSON starts with (``world_header``).
* The edit stream: the first facts of the world's stream with the next one held back as the probe edit
  (``stream_with_probe``), the marks up to the number of edits (``marks_up_to``) and the times since the
  previous mark (``since_mark``).
* Near neighbours: the cases with the image of another subject whose look differs from the edited subject's in
  one attribute (``with_near_neighbours``), for ``modal_locality_near``.
* Timing: milliseconds as the JSON prints them (``ms``), the best of repeated calls (``timed``), request
  latencies timed round-robin (``latencies``) in a thread of their own as the server runs requests
  (``in_thread``), and the ratio of two rows' medians (``median_ratio``).
* The service: a temporary folder (``scratch``), a real MLflow registry on sqlite in it (``open_registry``) and
  a real EditLens server on 127.0.0.1 with an SDK client (``service``), stopped when the bench is done.

Nothing heavy is imported here at module level: the server, the registry and the SDK are imported by the
functions that start them, as the benches did.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

StageFn = Callable[[str], None]
TickFn = Callable[[int, int], None]


def sayer(stage: StageFn | None) -> StageFn:
    """The bench's stage printer, or one that prints nothing."""
    return stage or (lambda s: None)


def world_header(vlm, world_dir: Path, layer: int) -> dict[str, Any]:
    """The first keys of a model bench's result: the world, the model's fingerprint and the edited layer."""
    return {"world": str(world_dir), "fingerprint": vlm.fingerprint, "layer": layer}


# -- the edit stream ------------------------------------------------------------------------------------------


def stream_with_probe(world_dir: Path, edits: int, render: bool = True) -> tuple[list[dict], dict]:
    """The first ``edits`` facts of the world's edit stream and the next one (the probe edit: the same work
    at every mark), with the images of the stream's new entities drawn unless ``render`` is false."""
    from vlm.world.stream import edit_stream, load_world, render_stream_images

    records = edit_stream(load_world(world_dir), edits + 1)
    if render:
        render_stream_images(world_dir, records)
    return records[:-1], records[-1]


def with_near_neighbours(
    world_dir: Path, cases: list[dict[str, Any]], scratch_dir: Path, pixels: Callable | None = None
) -> list[dict[str, Any]]:
    """Copies of ``cases`` (the originals are left as they are) with their subject's near neighbour
    (``vlm.world.stream.NearNeighbours``): ``image_near`` (its rendering; a stream entity's not drawn yet is
    drawn into ``scratch_dir``, never into the world), ``near_entity``, ``near_attribute``, ``near_source`` and
    ``near_answer`` (the neighbour's own value of the case's relation); a case whose subject has none is copied
    without them (``near_summary`` counts them).
    ``pixels`` (an ``editors.metrics.PixelCache``) is handed every neighbour's image as it is found, so that a
    drawing in ``scratch_dir`` is processed (and kept processed) before the folder goes."""
    from vlm.world.stream import NearNeighbours, load_world

    near = NearNeighbours(load_world(world_dir))
    out = []
    for c in cases:
        nb = near.of(c["entity"])
        if nb is None:
            out.append(dict(c))
            continue
        drawn = near.draw(world_dir, nb, scratch_dir)  # relative to the world where it is the world's own
        image = nb.image if drawn == Path(world_dir) / nb.image else str(drawn.resolve())
        if pixels is not None:
            pixels(image)
        out.append(
            {
                **c,
                "image_near": image,
                "near_entity": nb.entity.id,
                "near_attribute": nb.attribute,
                "near_source": nb.source,
                "near_answer": nb.answer(c["relation"]),
            }
        )
    return out


def near_summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """How many of ``cases`` (``with_near_neighbours``'s) have a near neighbour and how many have none; of those
    that have one, how many differ in each attribute and come from each source."""
    from vlm.world.stream import LOOK_ATTRIBUTES, NEIGHBOUR_SOURCES

    near = [c for c in cases if c.get("image_near")]
    return {
        "cases": len(near),
        "without": len(cases) - len(near),
        "attribute": {a: sum(c["near_attribute"] == a for c in near) for a in LOOK_ATTRIBUTES},
        "source": {s: sum(c["near_source"] == s for c in near) for s in NEIGHBOUR_SOURCES},
    }


def marks_up_to(marks: Iterable[int], n: int) -> list[int]:
    """The marks up to ``n`` (and ``n`` itself), in order."""
    return sorted({m for m in marks if m <= n} | {n})


def since_mark(times: list[float], mark: int, previous: int) -> list[float]:
    """The times of the edits since the previous mark (``times`` holds one per edit up to ``mark``)."""
    return times[-(mark - previous) :]


# -- timing ---------------------------------------------------------------------------------------------------


def ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def timed(fn: Callable, repeat: int = 1) -> tuple[float, object]:
    """The best time of ``repeat`` calls of ``fn`` (seconds) and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def latencies(fns: dict[str, Callable], requests: int, warmup: int = 2) -> dict[str, dict]:
    """Time every function ``requests`` times, round-robin (so that a load that comes and goes on the
    machine spreads over all rows alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(requests):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = {
            "median_ms": ms(statistics.median(ts)),
            "mean_ms": ms(statistics.fmean(ts)),
            "p90_ms": ms(ts[min(len(ts) - 1, int(0.9 * len(ts)))]),
            "requests": requests,
        }
    return out


def in_thread(fn: Callable):
    """Run ``fn`` in a fresh thread, as the server runs every request (torch's intra-op threading differs
    between the main thread and others; on a loaded machine the main thread's can be much slower)."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fn()))
    t.start()
    t.join()
    return box["out"]


def median_ratio(rows: dict[str, dict], over: str, under: str) -> float:
    """Row ``over``'s median latency over row ``under``'s (``latencies`` rows), to three decimals."""
    return round(rows[over]["median_ms"] / rows[under]["median_ms"], 3)


# -- the service ----------------------------------------------------------------------------------------------


@contextmanager
def scratch(bench: str) -> Iterator[Path]:
    """A temporary folder for one bench run (``editlens-bench-<bench>-...``), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"editlens-bench-{bench}-") as tmp:
        yield Path(tmp)


def open_registry(folder: Path):
    """A real MLflow registry on sqlite in ``folder/registry``."""
    from registry import Registry

    return Registry(data_dir=folder / "registry")


@dataclass
class Service:
    """A running EditLens server and an SDK client connected to it."""

    server: Any
    address: str
    lens: Any


@contextmanager
def running_server(vlm, registry, config=None, ready_s: float = 120) -> Iterator[tuple[Any, str]]:
    """A real EditLens server (gRPC on 127.0.0.1, port 0 unless ``config`` says otherwise) serving ``vlm`` over
    ``registry``, ready; yields it and its address, and stops it afterwards."""
    from server.app import EditLensServer
    from server.config import ServerConfig

    server = EditLensServer(config or ServerConfig(port=0), vlm=vlm, registry=registry)
    address = server.start()
    try:
        server.wait_ready(ready_s)
        yield server, address
    finally:
        server.stop(0)


@contextmanager
def service(vlm, registry, config=None, ready_s: float = 120) -> Iterator[Service]:
    """``running_server`` with an SDK client connected to it (closed before the server stops)."""
    from client.sdk import EditLensClient

    with running_server(vlm, registry, config, ready_s) as (server, address), EditLensClient(address) as lens:
        yield Service(server, address, lens)
