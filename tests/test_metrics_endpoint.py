"""Prometheus metrics (issue 29 item 4): a server started with a metrics port serves the exposition format on
loopback, scraped here with a real HTTP client, and its series move with what the server does: requests by
method and status code with their latencies, generation batch sizes and the waiting queue, jobs, edits by
outcome, the live version per adapter, readiness. Without the setting there is no endpoint."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import sdk

TOKEN = "metrics"


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.numerics
@pytest.mark.slow
def test_metrics_are_served_and_follow_what_the_server_does(start_service, insertion_case, world_dir):
    svc = start_service(token=TOKEN, metrics_port=0)
    port = svc.server.metrics_port
    assert port
    case = insertion_case
    img = world_dir / case["image"]
    other = next(a for a in (case["loc_ans"], case["m_loc_a"], case["alt"]) if a != case["ground_truth"])
    before = _scrape(port)
    assert before[("editlens_ready", ())] == 1.0
    assert before[("editlens_jobs", (("queue", "edits"), ("state", "running")))] == 0
    with svc.client(token=TOKEN) as lens:
        for _ in range(3):
            lens.generate(img, case["src"])
        with pytest.raises(sdk.InvalidArgumentError):
            lens.generate(img, "")
        v = lens.edit(
            img, case["src"], case["constraint"], case["ground_truth"], adapter="watched", editor="multedit", layer=0
        )
        with pytest.raises(sdk.FailedPreconditionError):
            lens.edit(
                img,
                case["src"],
                case["constraint"],
                other,
                adapter="watched",
                editor="multedit",
                layer=0,
                steps=1,
                lr=1e-12,
            )
        lens.generate(img, case["src"], adapter="watched")
    after = _scrape(port)
    ok = after[("editlens_requests_total", (("code", "OK"), ("method", "Generate")))]
    assert ok == 4
    assert after[("editlens_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Generate")))] == 1
    assert after[("editlens_requests_total", (("code", "OK"), ("method", "Edit")))] == 1
    assert after[("editlens_requests_total", (("code", "FAILED_PRECONDITION"), ("method", "Edit")))] == 1
    assert after[("editlens_request_seconds_count", (("method", "Generate"),))] == 5
    assert after[("editlens_request_seconds_sum", (("method", "Edit"),))] > 0
    edits = {k[1]: n for k, n in after.items() if k[0] == "editlens_edits_total"}
    assert edits[(("adapter", "watched"), ("editor", "multedit"), ("outcome", "registered"))] == 1
    assert edits[(("adapter", "watched"), ("editor", "multedit"), ("outcome", "FAILED_PRECONDITION"))] == 1
    assert after[("editlens_live_version", (("adapter", "watched"),))] == v.version
    assert after[("editlens_batch_size_count", ())] >= 1  # batching is on by default: every Generate decoded
    assert after[("editlens_generation_waiting", ())] == 0


def test_no_metrics_endpoint_unless_asked(start_service):
    svc = start_service()
    assert svc.server.metrics_port is None and svc.service.metrics is None
