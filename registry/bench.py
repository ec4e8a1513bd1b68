"""Timing of registry operations (``editlens bench registry``).

``measure(registry_factory, n)`` opens one registry, builds an adapter of ``n`` versions in
it and times every operation ``n`` times (each repetition separately, median and max
reported in milliseconds). The adapter is deleted afterwards.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from .store import Registry


def _write_edit_set(path: Path, nbytes: int) -> None:
    """A genuine safetensors file of about ``nbytes`` (the registry treats it as opaque)."""
    try:
        import numpy as np
        from safetensors.numpy import save_file

        n = max(1, nbytes // 4)
        rng = np.random.default_rng(0)
        save_file({"u": rng.standard_normal(n // 2).astype("float32"),
                   "v": rng.standard_normal(n - n // 2).astype("float32")}, str(path))
    except ImportError:  # numpy/safetensors missing: opaque bytes are as good for timing
        path.write_bytes(bytes(nbytes))


def _stats(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000.0 for s in samples]
    return {"median_ms": round(statistics.median(ms), 4), "max_ms": round(max(ms), 4), "reps": len(ms)}


def measure(registry_factory: Callable[[], Registry], n: int = 20, *, file_bytes: int = 3584) -> dict:
    """Time the registry operations; returns {"backend", "n", "file_bytes", "open_ms",
    op: {"median_ms", "max_ms", "reps"}} for create_version, versions, version_live,
    live_version_number (a lookup) and live_version_number_cached (answered from memory
    within live_ttl), set_alias, rollback, download_cold (after clearing the cache) and
    download_warm (cached copy, checksums re-verified)."""
    if n < 2:
        raise ValueError("n must be at least 2")
    t0 = time.perf_counter()
    reg = registry_factory()
    open_s = time.perf_counter() - t0
    adapter = f"bench-{uuid.uuid4().hex[:10]}"
    out: dict = {"backend": reg.tracking_uri, "n": n, "file_bytes": file_bytes,
                 "open_ms": round(open_s * 1000.0, 2)}
    times: dict[str, list[float]] = {k: [] for k in (
        "create_version", "versions", "version_live", "live_version_number", "live_version_number_cached",
        "set_alias", "rollback", "download_cold", "download_warm")}

    def timed(key: str, fn):
        t = time.perf_counter()
        r = fn()
        times[key].append(time.perf_counter() - t)
        return r

    try:
        with tempfile.TemporaryDirectory(prefix="editlens-bench-") as tmp:
            f = Path(tmp) / "multedit.safetensors"
            _write_edit_set(f, file_bytes)
            for i in range(n):
                manifest = {"edits": [{"i": j, "request": {"question": "q", "answer": "a"}} for j in range(i + 1)]}
                timed("create_version", lambda: reg.create_version(
                    adapter, {"multedit.safetensors": f}, manifest, base_fingerprint="bench",
                    editor="multedit", num_edits=i + 1, parent=i or None))
            for _ in range(n):
                timed("versions", lambda: reg.versions(adapter))
                timed("version_live", lambda: reg.version(adapter, "live"))
                timed("live_version_number", lambda: reg.live_version_number(adapter, max_age=0))
            reg.live_version_number(adapter)
            for _ in range(n):
                timed("live_version_number_cached", lambda: reg.live_version_number(adapter))
            for i in range(n):
                timed("set_alias", lambda: reg.set_alias(adapter, "live", 1 + i % n))
            for _ in range(n):
                reg.set_alias(adapter, "live", n)
                timed("rollback", lambda: reg.rollback(adapter))
            for i in range(n):
                v = 1 + i % n
                reg.clear_cache(adapter, v)
                timed("download_cold", lambda: reg.download(adapter, v))
                timed("download_warm", lambda: reg.download(adapter, v))
    finally:
        try:
            reg.delete_adapter(adapter)
        except Exception:
            pass
    for k, v in times.items():
        out[k] = _stats(v)
    return out
