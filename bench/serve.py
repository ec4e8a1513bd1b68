"""``editlens bench serve``: the service's latencies on the tiny model, through the real gRPC path.

* Generate latency (SDK -> server -> model, greedy, one request at a time) with no edit and with
  1, 10 and 100 live MultEdit edits (real edits of the world's test cases at layer 0, made in one
  batch with ``MultEdit.edit_each`` and registered as versions), next to the same generation
  in-process without gRPC.
* Version switch: what changing the served version costs the server (attaching the version's edits
  to the loaded model for a request and detaching them: forward hooks, no weight copied), and a
  whole rollback (the Rollback call, i.e. the registry write, then the first answer served by the
  version now live, with its bundle in memory and cold: downloaded, validated, loaded), next to
  reloading the base model from disk (what a server without per-request versions would do); the
  ratios are reload / switch. On the tiny model a reload takes tens of milliseconds; on a 7B model
  it takes tens of seconds, while the switch stays the same.
* Registry operation times (MLflow on sqlite in a temporary folder); ``publish_ms`` is what registering a
  version costs the server (the edit set written, the manifest built, the version created).
* With ``clients``: N concurrent clients (one SDK channel and one thread each, in a separate load-generator
  process) sending Generate calls with mixed versions (round-robin over the base model and the versions:
  every registered one, or ``mixed_versions`` of them), ``requests`` each after an unmeasured warm-up;
  requests/s over the wall time, p50 and p99 latency per client count, the throughput over one client's and
  the mean batch the server decoded. The same clients then run against a server that does not batch
  (``max_batch_size=1``: every request its own forward passes in its own thread), the reference of the
  same run (``clients_unbatched``, ``batched_over_unbatched``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def _timed(fn: Callable, repeat: int = 1) -> tuple[float, object]:
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
            "median_ms": _ms(statistics.median(ts)),
            "mean_ms": _ms(statistics.fmean(ts)),
            "p90_ms": _ms(ts[min(len(ts) - 1, int(0.9 * len(ts)))]),
            "requests": requests,
        }
    return out


def in_thread(fn: Callable):
    """Run ``fn`` in a fresh thread, as the server runs every request (torch's intra-op threading differs
    between the main thread and others; on a loaded machine the main thread's can be much slower)."""
    import threading

    box = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fn()))
    t.start()
    t.join()
    return box["out"]


def _client_load(address: str, image: str, question: str, refs: list[dict], n: int, requests: int) -> dict:
    """In a process of its own (a load generator, as real clients are: they do not share the server's
    interpreter lock): ``n`` threads, each with its own channel, send ``requests // 4`` unmeasured Generate
    calls (the server's steady state), then ``requests`` measured ones round-robin over ``refs``."""
    import threading

    from client.sdk import EditLensClient

    times: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(n + 1)
    warm = max(2, requests // 4)

    def client(i: int) -> None:
        with EditLensClient(address) as lens:
            for k in range(warm):
                lens.generate(image, question, **refs[(i + k) % len(refs)])
            start.wait()
            for k in range(requests):
                t0 = time.perf_counter()
                lens.generate(image, question, **refs[(i + k) % len(refs)])
                with lock:
                    times.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    times.sort()
    return {
        "clients": n,
        "requests": len(times),
        "requests_per_s": round(len(times) / wall, 2),
        "p50_ms": _ms(times[len(times) // 2]),
        "p99_ms": _ms(times[min(len(times) - 1, int(0.99 * len(times)))]),
    }


def concurrent_clients(address, image, question, refs, counts, requests: int, batcher=None) -> list[dict]:
    """For each client count N: N concurrent clients (threads of one separate load-generator process) send
    ``requests`` Generate calls each, round-robin over ``refs`` (the request's version: ``{"base": True}`` or
    adapter and version); rows ``{"clients", "requests_per_s", "p50_ms", "p99_ms", "throughput_vs_1_client"}``
    and, given the server's ``batcher``, the mean batch it decoded for that client count."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    rows = []
    with ctx.Pool(1) as pool:
        for n in counts:
            before = batcher.stats() if batcher is not None else None
            row = pool.apply(_client_load, (address, str(image), question, refs, n, requests))
            if before is not None:
                after = batcher.stats()
                batches = after["batches"] - before["batches"]
                row["mean_batch"] = round((after["rows"] - before["rows"]) / batches, 2) if batches else None
            rows.append(row)
    base = next((r["requests_per_s"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        r["throughput_vs_1_client"] = round(r["requests_per_s"] / base, 3) if base else None
    return rows


def run(
    vlm,
    world_dir: Path,
    edit_counts=(1, 10, 100),
    requests: int = 20,
    steps: int = 25,
    stage: Callable[[str], None] = lambda m: None,
    clients: tuple[int, ...] = (),
    mixed_versions: int | None = None,
) -> dict:
    """The serving benchmark (see the module docstring); returns a JSON-ready dict."""
    import json

    import torch

    from client.sdk import EditLensClient
    from editors.multedit import MultEdit, MultEditConfig
    from editors.request import EditRequest
    from registry import Registry
    from server.app import EditLensServer
    from server.bundles import publish
    from server.config import ServerConfig
    from server.versions import Versions
    from vlm import encode, generate, load_vlm

    if not edit_counts or min(edit_counts) < 1:
        raise ValueError("edit counts must be positive")
    if len(set(edit_counts)) < 2:
        raise ValueError("give at least two different --edits counts (the version switch goes from one to another)")
    if requests < 1:
        raise ValueError("requests must be positive")
    if clients and min(clients) < 1:
        raise ValueError("client counts must be positive")
    if mixed_versions is not None and mixed_versions < 0:
        raise ValueError("--versions must be >= 0")
    cases = json.loads((world_dir / "edit_cases" / "test.json").read_text())
    n_max = max(edit_counts)
    if n_max > len(cases):
        raise ValueError(f"at most {len(cases)} edits (the world's test cases)")
    result: dict = {
        "device": str(vlm.device),
        "dtype": str(vlm.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "requests": requests,
    }
    probe = cases[0]
    image, question = world_dir / probe["image"], probe["src"]

    with tempfile.TemporaryDirectory(prefix="editlens-bench-serve-") as tmp:
        tmp = Path(tmp)
        stage("opening a registry (MLflow on sqlite)")
        t_open, registry = _timed(lambda: Registry(data_dir=tmp / "registry"))
        t_check, _ = _timed(registry.check)
        stage(f"making {n_max} MultEdit edits at layer 0 ({steps} value steps at most)")
        reqs = [EditRequest.from_case(c, world_dir) for c in cases[:n_max]]
        for r, c in zip(reqs, cases):
            r.answer = c["alt"]
        t0 = time.perf_counter()
        singles = in_thread(lambda: MultEdit(vlm, MultEditConfig(layer=0, steps=steps)).edit_each(reqs, batch_size=25))
        result["edit_seconds"] = round(time.perf_counter() - t0, 2)
        sets = {}
        for n in edit_counts:
            s = singles[0]
            for more in singles[1:n]:
                s = s.extended(more)
            sets[n] = s

        stage("registering the versions")
        ops: dict = {"open_ms": _ms(t_open + t_check)}
        versions, sizes = {}, {}
        for n, s in sets.items():
            t, info = _timed(lambda s=s: publish(registry, vlm, "bench", {s.editor: s}, edits=s.records, promote=False))
            versions[n] = info.version
            ops.setdefault("publish_ms", {})[str(n)] = _ms(t)
            sizes[str(n)] = s.save(tmp / f"edits-{n}.safetensors")
        mix = list(versions.values())  # the versions concurrent clients ask for (besides the base model)
        k = len(mix) if mixed_versions is None else mixed_versions
        for j in range(len(mix), k):  # more versions than edit counts: one more version per single edit
            one = singles[j % len(singles)]
            mix.append(publish(registry, vlm, "bench", {one.editor: one}, edits=one.records, promote=False).version)
        mix = mix[:k]

        server = EditLensServer(ServerConfig(port=0, bundle_cache=len(mix) + 2), vlm=vlm, registry=registry)
        address = server.start()
        server.wait_ready(60)
        try:
            with EditLensClient(address) as lens:
                stage(f"Generate latency, {requests} requests per row")
                prompt = encode(vlm.processor, question, image=image)
                fns: dict[str, Callable] = {
                    "in-process, no gRPC, no edit": lambda: generate(vlm, [prompt]),
                    "no edit": lambda: lens.generate(image, question, base=True),
                }
                for n, v in versions.items():
                    fns[f"{n} live edit{'s' if n > 1 else ''}"] = lambda v=v: lens.generate(
                        image, question, adapter="bench", version=v
                    )
                # in a thread of its own, as the server runs every request (torch's intra-op threading
                # differs between the main thread and others)
                result["generate"] = in_thread(lambda: latencies(fns, requests))
                if clients:
                    stage(
                        f"{'/'.join(map(str, clients))} concurrent clients, {requests} requests each, the base "
                        f"model and {len(mix)} version(s) mixed: batched"
                    )
                    refs = [{"base": True}] + [{"adapter": "bench", "version": v} for v in mix]
                    result["versions_mixed"] = len(mix)
                    result["batching"] = {
                        "max_batch_size": server.config.max_batch_size,
                        "batch_wait_ms": server.config.batch_wait_ms,
                    }
                    result["clients"] = concurrent_clients(
                        address, image, question, refs, clients, requests, server.batcher
                    )
                    stage("the same clients against a server that does not batch (--max-batch-size 1)")
                    plain = EditLensServer(
                        ServerConfig(port=0, bundle_cache=len(mix) + 2, max_batch_size=1), vlm=vlm, registry=registry
                    )
                    try:
                        plain_address = plain.start()
                        plain.wait_ready(60)
                        result["clients_unbatched"] = concurrent_clients(
                            plain_address, image, question, refs, clients, requests
                        )
                    finally:
                        plain.stop(0)
                    for row, ref in zip(result["clients"], result["clients_unbatched"]):
                        row["batched_over_unbatched"] = round(row["requests_per_s"] / ref["requests_per_s"], 3)

                stage("version switch (rollback) against a base-model reload")
                order = sorted(versions)
                lo, hi = versions[order[0]], versions[order[-1]]
                lens.promote(lo, adapter="bench")
                lens.promote(hi, adapter="bench")

                warm = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    lens.rollback(adapter="bench")
                    g = lens.generate(image, question, adapter="bench")
                    warm.append(time.perf_counter() - t0)
                    assert g.served.version == lo
                    lens.promote(hi, adapter="bench")
                    lens.generate(image, question, adapter="bench")
                cold = []
                for _ in range(3):
                    server.unload_version("bench", lo)
                    registry.clear_cache("bench", lo)
                    t0 = time.perf_counter()
                    lens.rollback(adapter="bench")
                    g = lens.generate(image, question, adapter="bench")
                    cold.append(time.perf_counter() - t0)
                    lens.promote(hi, adapter="bench")
                    lens.generate(image, question, adapter="bench")
                t_roll, _ = _timed(lambda: lens.rollback(adapter="bench"), 1)
                lens.promote(hi, adapter="bench")
                stage("reloading the base model from disk")
                reload = [
                    in_thread(lambda: _timed(lambda: load_vlm(vlm.path, device=vlm.device, dtype=vlm.dtype))[0])
                    for _ in range(2)
                ]
                bundle = server.loaded_version("bench", hi)

                def attach_detach():
                    with bundle.attached(vlm):
                        pass

                t_attach = min(_timed(attach_detach, 1)[0] for _ in range(20))
                sw_warm, sw_cold, rl = min(warm), min(cold), min(reload)
                result["switch"] = {
                    "from_edits": order[-1],
                    "to_edits": order[0],
                    "attach_and_detach_ms": round(1000 * t_attach, 4),
                    "rollback_call_ms": _ms(t_roll),
                    "rollback_and_first_answer_ms": _ms(sw_warm),
                    "rollback_and_first_answer_cold_ms": _ms(sw_cold),
                    "base_model_reload_ms": _ms(rl),
                    "reload_over_attach": round(rl / t_attach),
                    "reload_over_switch": round(rl / sw_warm, 2),
                    "reload_over_cold_switch": round(rl / sw_cold, 2),
                }
        finally:
            server.stop(0)

        stage("registry operations")
        a, v = "bench", versions[order[0]]
        ops["versions_ms"] = _ms(_timed(lambda: registry.versions(a), 3)[0])
        ops["get_version_ms"] = _ms(_timed(lambda: registry.version(a, v), 3)[0])
        ops["manifest_ms"] = _ms(_timed(lambda: registry.version(a, v).manifest, 3)[0])
        ops["live_lookup_uncached_ms"] = _ms(_timed(lambda: registry.live_version_number(a), 5)[0])
        cache = Versions(registry, vlm, a, live_ttl=60, cache_size=1)
        cache.live_version(a)
        ops["live_lookup_cached_ms"] = _ms(_timed(lambda: cache.live_version(a), 5)[0])
        ops["set_alias_ms"] = _ms(_timed(lambda: registry.set_alias(a, "live", v), 3)[0])
        ops["rollback_ms"] = _ms(
            _timed(lambda: (registry.set_alias(a, "live", versions[order[-1]]), registry.rollback(a))[1], 1)[0]
        )

        def cold_download():
            registry.clear_cache(a, v)
            return registry.download(a, v)

        ops["download_cold_ms"] = _ms(_timed(cold_download, 3)[0])
        ops["download_cached_ms"] = _ms(_timed(lambda: registry.download(a, v), 3)[0])
        ops["delete_version_ms"] = _ms(_timed(lambda: registry.delete_version(a, versions[order[-1]]), 1)[0])
        result["registry"] = ops
        result["edit_set_bytes"] = sizes
    return result
