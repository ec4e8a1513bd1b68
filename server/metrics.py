"""Prometheus metrics of one server (``editlens serve --metrics-port PORT``; off by default).

What an operator watches, on ``http://HOST:PORT/metrics`` (``--metrics-host``, loopback by default; the
endpoint has no authentication of its own, so bind it where only the scraper reaches it):

* ``editlens_requests_total{method, code}``: RPCs answered, by method and gRPC status code;
* ``editlens_request_seconds{method}``: their latency (a streaming call: until its last message);
* ``editlens_batch_size``: Generate/GenerateStream rows decoded together per batch;
* ``editlens_generation_waiting``: generation requests waiting for a batch (queue depth);
* ``editlens_jobs{queue, state}``: jobs running and queued (queue: edits — Edit and TrainVisEdit — or
  diagnoses);
* ``editlens_edits_total{adapter, editor, outcome}``: Edit calls that ended (outcome: registered, or the
  status code of the refusal);
* ``editlens_live_version{adapter}``: each adapter's live version as this server last looked it up (0:
  none, the base model answers);
* ``editlens_ready``: 1 once the model is loaded and the server is SERVING.

Each server has its own ``CollectorRegistry`` (tests run several servers in one process); the gauges are read
from the server's state when scraped, never written on the request path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("editlens.server")

#: request latency buckets, seconds: generation (tens of ms) up to edits and diagnostics (minutes)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _State(Collector):
    """The gauges, read from the servicer when scraped."""

    def __init__(self, service):
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        svc = self.service
        jobs = GaugeMetricFamily("editlens_jobs", "Jobs running and queued.", labels=["queue", "state"])
        for queue, runner in (("edits", svc.jobs), ("diagnoses", svc.diagnoses)):
            jobs.add_metric([queue, "running"], runner.running)
            jobs.add_metric([queue, "queued"], runner.queued)
        yield jobs
        host = svc.host
        ready = GaugeMetricFamily("editlens_ready", "1 once the model is loaded and the server is SERVING.")
        ready.add_metric([], 1.0 if host is not None else 0.0)
        yield ready
        waiting = GaugeMetricFamily(
            "editlens_generation_waiting", "Generation requests waiting for a batch (the batcher's queue depth)."
        )
        waiting.add_metric([], host.batcher.waiting if host is not None and host.batcher is not None else 0)
        yield waiting
        live = GaugeMetricFamily(
            "editlens_live_version",
            "Each adapter's live version as this server last looked it up (0: none, the base model answers).",
            labels=["adapter"],
        )
        if host is not None:
            for adapter, version in sorted(host.versions.known_live().items()):
                live.add_metric([adapter], version or 0)
        yield live


class Metrics:
    """The metrics of one server: request counters and latencies, batch sizes, edits, and the state gauges."""

    def __init__(self, service):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "editlens_requests", "RPCs answered, by method and status code.", ["method", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "editlens_request_seconds",
            "RPC latency in seconds (a streaming call: until its last message).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "editlens_batch_size",
            "Generation rows decoded together per batch.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.edits = Counter(
            "editlens_edits",
            "Edit calls that ended, by adapter, editor and outcome (registered, or the refusal's status code).",
            ["adapter", "editor", "outcome"],
            registry=self.registry,
        )
        self.registry.register(_State(service))
        self._http: Any = None

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the port it listens on (``port`` 0: a free one)."""
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc}") from None
        return self._http.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
