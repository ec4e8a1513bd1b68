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

import time
from collections.abc import Callable
from pathlib import Path

from .harness import Service, in_thread, latencies, ms, open_registry, running_server, scratch, service, timed

__all__ = ["concurrent_clients", "in_thread", "latencies", "run"]


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
        "p50_ms": ms(times[len(times) // 2]),
        "p99_ms": ms(times[min(len(times) - 1, int(0.99 * len(times)))]),
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


def _check(edit_counts, requests: int, clients, mixed_versions: int | None) -> None:
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


def _make_edits(vlm, world_dir: Path, cases: list[dict], edit_counts, steps: int) -> tuple[list, dict, float]:
    """One MultEdit edit per test case (new answer: the case's ``alt``) at layer 0, in one batch; returns the
    single edits, the edit set of each edit count (the first N single edits) and the editing seconds."""
    from editors.multedit import MultEdit, MultEditConfig
    from editors.request import EditRequest

    reqs = [EditRequest.from_case(c, world_dir) for c in cases[: max(edit_counts)]]
    for r, c in zip(reqs, cases):
        r.answer = c["alt"]
    t0 = time.perf_counter()
    singles = in_thread(lambda: MultEdit(vlm, MultEditConfig(layer=0, steps=steps)).edit_each(reqs, batch_size=25))
    seconds = round(time.perf_counter() - t0, 2)
    sets = {}
    for n in edit_counts:
        s = singles[0]
        for more in singles[1:n]:
            s = s.extended(more)
        sets[n] = s
    return singles, sets, seconds


def _register(registry, vlm, sets: dict, singles: list, mixed_versions: int | None, tmp: Path, ops: dict):
    """Every edit set registered as a version of adapter ``bench`` (not promoted; ``publish_ms`` into ``ops``),
    and the versions the concurrent clients mix; returns the versions by edit count, the edit sets' file sizes
    and the mix."""
    from server.bundles import publish

    versions, sizes = {}, {}
    for n, s in sets.items():
        t, info = timed(lambda s=s: publish(registry, vlm, "bench", {s.editor: s}, edits=s.records, promote=False))
        versions[n] = info.version
        ops.setdefault("publish_ms", {})[str(n)] = ms(t)
        sizes[str(n)] = s.save(tmp / f"edits-{n}.safetensors")
    mix = list(versions.values())  # the versions concurrent clients ask for (besides the base model)
    k = len(mix) if mixed_versions is None else mixed_versions
    for j in range(len(mix), k):  # more versions than edit counts: one more version per single edit
        one = singles[j % len(singles)]
        mix.append(publish(registry, vlm, "bench", {one.editor: one}, edits=one.records, promote=False).version)
    return versions, sizes, mix[:k]


def _generate_latency(vlm, lens, image: Path, question: str, versions: dict, requests: int) -> dict:
    """Generate in-process, through gRPC with the base model and with each version, round-robin."""
    from vlm import encode, generate

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
    return in_thread(lambda: latencies(fns, requests))


def _clients(vlm, registry, svc: Service, image, question, mix, clients, requests, stage, result: dict) -> None:
    """The concurrent clients against the batching server, then against one that does not batch; into
    ``result`` (``versions_mixed``, ``batching``, ``clients``, ``clients_unbatched``)."""
    from server.config import ServerConfig

    stage(
        f"{'/'.join(map(str, clients))} concurrent clients, {requests} requests each, the base "
        f"model and {len(mix)} version(s) mixed: batched"
    )
    refs = [{"base": True}] + [{"adapter": "bench", "version": v} for v in mix]
    result["versions_mixed"] = len(mix)
    result["batching"] = {
        "max_batch_size": svc.server.config.max_batch_size,
        "batch_wait_ms": svc.server.config.batch_wait_ms,
    }
    result["clients"] = concurrent_clients(svc.address, image, question, refs, clients, requests, svc.server.batcher)
    stage("the same clients against a server that does not batch (--max-batch-size 1)")
    plain = ServerConfig(port=0, bundle_cache=len(mix) + 2, max_batch_size=1)
    with running_server(vlm, registry, plain, ready_s=60) as (_, plain_address):
        result["clients_unbatched"] = concurrent_clients(plain_address, image, question, refs, clients, requests)
    for row, ref in zip(result["clients"], result["clients_unbatched"]):
        row["batched_over_unbatched"] = round(row["requests_per_s"] / ref["requests_per_s"], 3)


def _switch(vlm, registry, svc: Service, image, question, versions: dict, order: list, stage) -> dict:
    """Rollbacks from the most edits to the fewest (bundle warm and cold) and attaching a version, against
    reloading the base model."""
    from vlm import load_vlm

    server, lens = svc.server, svc.lens
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
    t_roll, _ = timed(lambda: lens.rollback(adapter="bench"), 1)
    lens.promote(hi, adapter="bench")
    stage("reloading the base model from disk")
    reload = [
        in_thread(lambda: timed(lambda: load_vlm(vlm.path, device=vlm.device, dtype=vlm.dtype))[0]) for _ in range(2)
    ]
    bundle = server.loaded_version("bench", hi)

    def attach_detach():
        with bundle.attached(vlm):
            pass

    t_attach = min(timed(attach_detach, 1)[0] for _ in range(20))
    sw_warm, sw_cold, rl = min(warm), min(cold), min(reload)
    return {
        "from_edits": order[-1],
        "to_edits": order[0],
        "attach_and_detach_ms": round(1000 * t_attach, 4),
        "rollback_call_ms": ms(t_roll),
        "rollback_and_first_answer_ms": ms(sw_warm),
        "rollback_and_first_answer_cold_ms": ms(sw_cold),
        "base_model_reload_ms": ms(rl),
        "reload_over_attach": round(rl / t_attach),
        "reload_over_switch": round(rl / sw_warm, 2),
        "reload_over_cold_switch": round(rl / sw_cold, 2),
    }


def _registry_ops(registry, vlm, versions: dict, order: list, ops: dict) -> None:
    """The registry's operations timed on adapter ``bench``, into ``ops`` (the last deletes a version)."""
    from server.versions import Versions

    a, v = "bench", versions[order[0]]
    ops["versions_ms"] = ms(timed(lambda: registry.versions(a), 3)[0])
    ops["get_version_ms"] = ms(timed(lambda: registry.version(a, v), 3)[0])
    ops["manifest_ms"] = ms(timed(lambda: registry.version(a, v).manifest, 3)[0])
    ops["live_lookup_uncached_ms"] = ms(timed(lambda: registry.live_version_number(a), 5)[0])
    cache = Versions(registry, vlm, a, live_ttl=60, cache_size=1)
    cache.live_version(a)
    ops["live_lookup_cached_ms"] = ms(timed(lambda: cache.live_version(a), 5)[0])
    ops["set_alias_ms"] = ms(timed(lambda: registry.set_alias(a, "live", v), 3)[0])
    ops["rollback_ms"] = ms(
        timed(lambda: (registry.set_alias(a, "live", versions[order[-1]]), registry.rollback(a))[1], 1)[0]
    )

    def cold_download():
        registry.clear_cache(a, v)
        return registry.download(a, v)

    ops["download_cold_ms"] = ms(timed(cold_download, 3)[0])
    ops["download_cached_ms"] = ms(timed(lambda: registry.download(a, v), 3)[0])
    ops["delete_version_ms"] = ms(timed(lambda: registry.delete_version(a, versions[order[-1]]), 1)[0])


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

    from server.config import ServerConfig

    _check(edit_counts, requests, clients, mixed_versions)
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

    with scratch("serve") as tmp:
        stage("opening a registry (MLflow on sqlite)")
        t_open, registry = timed(lambda: open_registry(tmp))
        t_check, _ = timed(registry.check)
        stage(f"making {n_max} MultEdit edits at layer 0 ({steps} value steps at most)")
        singles, sets, result["edit_seconds"] = _make_edits(vlm, world_dir, cases, edit_counts, steps)

        stage("registering the versions")
        ops: dict = {"open_ms": ms(t_open + t_check)}
        versions, sizes, mix = _register(registry, vlm, sets, singles, mixed_versions, tmp, ops)
        order = sorted(versions)

        with service(vlm, registry, ServerConfig(port=0, bundle_cache=len(mix) + 2), ready_s=60) as svc:
            stage(f"Generate latency, {requests} requests per row")
            result["generate"] = _generate_latency(vlm, svc.lens, image, question, versions, requests)
            if clients:
                _clients(vlm, registry, svc, image, question, mix, clients, requests, stage, result)
            stage("version switch (rollback) against a base-model reload")
            result["switch"] = _switch(vlm, registry, svc, image, question, versions, order, stage)

        stage("registry operations")
        _registry_ops(registry, vlm, versions, order, ops)
        result["registry"] = ops
        result["edit_set_bytes"] = sizes
    return result
