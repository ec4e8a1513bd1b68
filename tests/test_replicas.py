"""Two replicas on one registry: an edit that a replica built on a live version another replica has since
replaced is refused with ABORTED (and a message that says to retry) instead of making live a version that
lacks the other replica's edit; the retry builds on the new live version and keeps both edits."""

import threading
import time

import pytest

from client.sdk import AbortedError


@pytest.mark.numerics
@pytest.mark.slow
def test_concurrent_edits_of_one_adapter_on_two_replicas_never_lose_an_edit(start_service, test_cases, world_dir):
    a = start_service(live_ttl=0.2)
    b = start_service(data_dir=a.data_dir, live_ttl=0.2)  # the same registry folder: a second replica
    first, second = test_cases[0], next(c for c in test_cases if c["entity"] != test_cases[0]["entity"])

    def args(case):
        return (world_dir / case["image"], case["src"], case["constraint"], case["alt"])

    with a.client() as la, b.client() as lb:
        base = la.edit(*args(first), adapter="shared", editor="multedit", layer=0)
        outcome: dict[str, object] = {}
        computing = threading.Event()

        def progress(e):  # a stage past `queued`: A's job has read the live version (base.version)
            if e.stage != "queued":
                computing.set()

        def slow_on_a():  # every value-optimisation step (the target probability is never reached): ~seconds
            try:
                outcome["a"] = la.edit(
                    *args(second),
                    adapter="shared",
                    editor="multedit",
                    layer=0,
                    steps=400,
                    target_prob=0.99999,
                    progress=progress,
                )
            except AbortedError as exc:
                outcome["a"] = exc

        t = threading.Thread(target=slow_on_a)
        t.start()
        assert computing.wait(60), "A's edit job reported no stage past queued"
        on_b = lb.edit(*args(first), adapter="shared", editor="multedit", layer=0)  # quick: B registers first
        t.join(120)
        assert not t.is_alive()
        assert on_b.version == base.version + 1 and on_b.parent == base.version
        refused = outcome["a"]
        assert isinstance(refused, AbortedError), f"A registered over B's version: {refused}"
        assert "Retry" in refused.details and f"version {on_b.version} became live" in refused.details
        listed = lb.versions(adapter="shared")
        assert listed.live_version == on_b.version and len(listed.versions) == 2  # nothing of A's is left
        time.sleep(0.3)  # longer than live_ttl (0.2 s): A's cached live version has expired (the contract)
        retried = la.edit(*args(second), adapter="shared", editor="multedit", layer=0)
        assert retried.parent == on_b.version and retried.num_edits == on_b.num_edits + 1
        live = lb.version(retried.version, adapter="shared")
        assert [e.question for e in live.edits][-2:] == [first["src"], second["src"]]
