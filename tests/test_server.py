"""The gRPC service in-process (a real server on 127.0.0.1:0, the real tiny model, a real MLflow registry
on sqlite), driven through the SDK: generation, versions, jobs, diagnostics, auth, limits and every bad
input, each followed by a check that the server still serves."""

from __future__ import annotations

import io
import threading
import time
from urllib.parse import unquote, urlparse

import grpc
import pytest
import torch

from client import sdk

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def svc(start_service):
    return start_service(token=TOKEN)


@pytest.fixture(scope="module")
def lens(svc):
    with svc.client(token=TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def anon(svc):
    with svc.client() as c:
        yield c


@pytest.fixture(scope="module")
def case(keygate_case, world_dir):
    """A case the default editor (KeyGate) edits with generality (the server's edits here use the default)."""
    c = dict(keygate_case)
    c["img"] = world_dir / c["image"]
    c["img2"] = world_dir / c["image_rephrase"]
    c["loc_img"] = world_dir / c["m_loc"]
    return c


def _edit_set(vlm, fingerprint=None):
    """A valid one-edit MultEdit edit set whose delta is zero (it changes nothing)."""
    from editors.edit_set import EditSet, LowRankDelta

    module = vlm.arch.module_path("down_proj", 0)
    w = vlm.module(module).weight
    rec = {
        "request": {"question": "q ?", "constraint": "q", "answer": "a"},
        "editor": "multedit",
        "layer": 0,
        "metrics": {},
    }
    return EditSet(
        [LowRankDelta(0, module, torch.zeros(w.shape[0], 1), torch.zeros(w.shape[1], 1))],
        fingerprint or vlm.fingerprint,
        "multedit",
        {},
        [rec],
    )


class _RawFile:
    """Stands in for an edit set whose file is garbage (what a corrupted registry entry looks like)."""

    def __init__(self, raw: bytes):
        self.raw = raw

    def save(self, path):
        path.write_bytes(self.raw)
        return len(self.raw)


def _register(svc, vlm, tmp_path, adapter, fingerprint=None, raw: bytes | None = None):
    """A version published as the server publishes one: a zero edit (of another base model with
    ``fingerprint``), or a file of ``raw`` bytes."""
    from server.bundles import publish

    edit_set = _edit_set(vlm, fingerprint) if raw is None else _RawFile(raw)
    return publish(svc.registry, vlm, adapter, {"multedit": edit_set}, edits=[])


def _serves(lens, case):
    """The server still answers (base model: the model's own prediction)."""
    assert lens.generate(case["img"], case["src"], base=True).text == case["base_answer"]


# ------------------------------------------------------------------ basics
def test_health_info_reflection_and_generation(svc, lens, case, vlm):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert lens.health() == "SERVING" and lens.health("editlens.v1.EditLens") == "SERVING"
    info = lens.info()
    assert info.ready and info.base_fingerprint == vlm.fingerprint and info.auth_required
    assert info.limits["max_prompt_tokens"] > 0 and info.default_adapter == "default"
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(svc.address))
    resp = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    names = {s.name for s in resp.list_services_response.service}
    assert {"editlens.v1.EditLens", "grpc.health.v1.Health"} <= names

    g = lens.generate(case["img"], case["src"])  # the default adapter has no version: the base model
    assert g.text == case["base_answer"] and g.served.version == 0 and g.prompt_tokens > 16
    from PIL import Image

    pil = Image.open(case["img"])
    assert lens.generate(pil, case["src"]).text == g.text  # PIL image
    assert lens.generate(case["img"].read_bytes(), case["src"]).text == g.text  # bytes
    assert "".join(lens.generate_stream(case["img"], case["src"])) == g.text


@pytest.mark.numerics
def test_edit_versions_promote_rollback_delete(lens, anon, case):
    a = "flow"
    with pytest.raises(sdk.NotFoundError, match="adapter 'flow' not found"):
        lens.generate(case["img"], case["src"], adapter=a)
    events = []
    v1 = lens.edit(
        case["img"],
        case["src"],
        case["constraint"],
        case["ground_truth"],
        adapter=a,
        layer=0,
        rephrase=case["rephrase"],
        image_rephrase=case["img2"],
        progress=events.append,
    )
    stages = [e.stage for e in events]
    assert stages[0] == "queued" and {"key", "value", "update", "register"} <= set(stages)
    assert any(e.loss is not None for e in events)
    assert v1.version == 1 and v1.live and v1.num_edits == 1 and v1.editors == ["keygate"]  # the default editor
    rec = v1.edits[0]
    assert rec.layer == 0 and rec.answer == case["ground_truth"] and rec.version == 1
    assert rec.metrics["p_after"] > rec.metrics["p_before"] and "p_rephrase" in rec.metrics
    assert "keygate.safetensors" in v1.files and v1.manifest["base_fingerprint"] == v1.base_fingerprint

    g = anon.generate(case["img"], case["src"], adapter=a)
    assert (g.text, g.served.version, g.served.alias) == (case["ground_truth"], 1, "live")
    assert anon.generate(case["img"], case["rephrase"], adapter=a).text == case["ground_truth"]
    assert anon.generate(case["loc_img"], case["m_loc_q"], adapter=a).text == case["m_loc_answer"]

    # a second edit of the same fact to another answer, not promoted: v2 exists, live stays at v1 and keeps
    # answering v1's answer; a request pinned to v2 gets v2's edits (the other answer)
    v2 = lens.edit(
        case["img"], case["src"], case["constraint"], case["m_loc_answer"], adapter=a, layer=0, promote=False
    )
    assert v2.version == 2 and not v2.live and v2.parent == 1 and v2.num_edits == 2
    assert [e.version for e in v2.edits] == [1, 2]
    g1 = anon.generate(case["img"], case["src"], adapter=a)
    assert (g1.text, g1.served.version) == (case["ground_truth"], 1)
    g2 = anon.generate(case["img"], case["src"], adapter=a, version=2)
    assert (g2.text, g2.served.version) == (case["m_loc_answer"], 2)
    vl = anon.versions(a)
    assert [v.version for v in vl.versions] == [2, 1] and vl.live_version == 1 and vl.aliases == {"live": 1}

    lens.promote(2, adapter=a)
    assert anon.generate(case["img"], case["src"], adapter=a).served.version == 2
    lens.promote(1, adapter=a, alias="stable")
    assert anon.generate(case["img"], case["src"], adapter=a, alias="stable").served.version == 1
    back = lens.rollback(adapter=a)
    assert back.version == 1
    g = anon.generate(case["img"], case["src"], adapter=a)
    assert (g.text, g.served.version) == (case["ground_truth"], 1)
    with pytest.raises(sdk.FailedPreconditionError, match="live"):
        lens.delete(1, adapter=a)
    lens.delete(2, adapter=a)
    with pytest.raises(sdk.NotFoundError):
        anon.generate(case["img"], case["src"], adapter=a, version=2)
    assert lens.rollback(adapter=a) is None  # the first version: back to the base model
    g = anon.generate(case["img"], case["src"], adapter=a)
    assert (g.text, g.served.version) == (case["base_answer"], 0)
    assert anon.version(1, adapter=a, figures=True).version == 1


@pytest.mark.numerics
@pytest.mark.slow
def test_generation_during_an_edit_is_old_or_new_never_a_mix(lens, anon, case):
    """Generation keeps being served while the edit job runs, each answer from exactly one version."""
    old, new = case["base_answer"], case["ground_truth"]
    done = threading.Event()
    seen, errors, during = [], [], []

    def generate_loop():
        with sdk.EditLensClient(lens.target) as c:
            while not done.is_set():
                try:
                    g = c.generate(case["img"], case["src"])
                    seen.append((g.served.version, g.text, time.monotonic()))
                except Exception as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=generate_loop) for _ in range(3)]
    window = {}

    def progress(p):
        window.setdefault("start", time.monotonic())
        window["end"] = time.monotonic()

    for t in threads:
        t.start()
    try:
        v = lens.edit(case["img"], case["src"], case["constraint"], new, layer=0, progress=progress)
    finally:
        time.sleep(0.3)
        done.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert {(ver, text) for ver, text, _ in seen} <= {(0, old), (v.version, new)}, set(seen)
    during = [s for s in seen if window["start"] <= s[2] <= window["end"]]
    assert len(during) >= 3, f"only {len(during)} answers while the job ran"
    assert {text for _, text, _ in during} == {old}
    assert seen[-1][:2] == (v.version, new)


@pytest.mark.numerics
def test_diagnose_matches_the_local_diagnostic(lens, case, vlm, world_dir):
    from diagnostics.cases import DiagnosticCase, world_phrases
    from diagnostics.report import run_diagnostic

    events = []
    d = lens.diagnose(
        "trace",
        case["img"],
        case["src"],
        case["constraint"],
        png=True,
        base=True,
        kinds=["mlp"],
        progress=events.append,
    )
    local = run_diagnostic(
        vlm,
        "trace",
        [DiagnosticCase(case["src"], case["constraint"], image=case["img"], replacements=world_phrases(world_dir))],
        {"kinds": ["mlp"]},
    )
    remote, ref = d.values["mlp indirect effect"], local.matrices[0]
    assert remote.row_labels == ref.row_labels and len(remote.col_labels) == vlm.num_layers
    assert torch.allclose(torch.tensor(remote.values), torch.tensor(ref.values), atol=1e-5)
    assert d.recommended_layer == local.recommended_layer and d.served.version == 0
    assert d.png[:8] == b"\x89PNG\r\n\x1a\n"
    assert d.scalars["p_clean"] == pytest.approx(local.scalars["p_clean"], abs=1e-6)
    assert d.scalars["p_corrupt"] == pytest.approx(local.scalars["p_corrupt"], abs=1e-6)
    assert events[0].stage == "queued" and any(e.stage == "cells" for e in events)
    assert d.data["method"] == "token-replacement" and d.lines[0].startswith("token-replacement trace")
    r = lens.diagnose(
        "recommend", case["img"], case["src"], case["constraint"], base=True, editor="both", rephrase=case["rephrase"]
    )
    assert (
        r.recommended_layer == r.recommendations[0].layer
        and [x.editor for x in r.recommendations] == ["multedit", "visedit"]
        and r.png is None
    )
    # the default editor picks its layer as MultEdit does (EditorSpec.layer_rule); FT-L by no diagnostic
    k = lens.diagnose("recommend", case["img"], case["src"], case["constraint"], base=True, editor="keygate")
    assert [x.editor for x in k.recommendations] == ["multedit"] and k.recommended_layer == r.recommended_layer
    with pytest.raises(sdk.InvalidArgumentError, match="'ft' chooses no layer by a diagnostic"):
        lens.diagnose("recommend", case["img"], case["src"], case["constraint"], base=True, editor="ft")


def test_cancelled_edit_registers_nothing(lens, case):
    class Stop(Exception):
        pass

    def progress(p):
        if p.stage == "value":
            raise Stop

    with pytest.raises(Stop):
        lens.edit(
            case["img"],
            case["src"],
            case["constraint"],
            case["ground_truth"],
            adapter="cancelled",
            layer=0,
            progress=progress,
        )
    deadline = time.monotonic() + 20
    while lens.info().jobs_running and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(sdk.NotFoundError):
        lens.versions("cancelled")
    _serves(lens, case)


def test_full_queue_is_resource_exhausted_and_generation_goes_on(svc, lens, case):
    jobs = svc.service.diagnoses  # the diagnostics' own queue
    release = threading.Event()
    saved = jobs.max_queued
    jobs.max_queued = 0
    try:
        blocker, _ = jobs.submit("block", lambda job: release.wait(30))
        while jobs.running == 0:
            time.sleep(0.01)
        with pytest.raises(sdk.ResourceExhaustedError, match="queue is full"):
            lens.diagnose("module-attribution", case["img"], case["src"], case["constraint"])
        _serves(lens, case)  # generation is not queued behind jobs
    finally:
        jobs.max_queued = saved
        release.set()


def test_not_ready_is_unavailable(start_service, case, tmp_path):
    svc = start_service(model_vlm=None, model=tmp_path / "missing-model")
    svc.server.wait_ready(30)
    with svc.client() as c:
        assert c.health() == "NOT_SERVING" and not c.info().ready
        with pytest.raises(sdk.UnavailableError, match="could not load its model"):
            c.generate(case["img"], case["src"])


# --------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def known(svc, vlm, tmp_path_factory):
    """An adapter registered directly (a zero edit), for the version-lookup errors."""
    return _register(svc, vlm, tmp_path_factory.mktemp("known"), "known")


def _png(size=(64, 64)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, format="PNG")
    return buf.getvalue()


def _corrupt_artifact(svc, adapter):
    mv = svc.registry.client.get_model_version(adapter, "1")
    path = unquote(urlparse(mv.source).path) + "/multedit.safetensors"
    data = bytearray(open(path, "rb").read())
    data[12] ^= 0xFF  # one byte of the header (the tensors of a zero edit are all zeros)
    open(path, "wb").write(bytes(data))


BAD = {
    "undecodable image": lambda t: t.lens.generate(b"not an image at all", t.case["src"]),
    "empty prompt": lambda t: t.lens.generate(t.case["img"], "   "),
    "prompt over the token limit": lambda t: t.lens.generate(t.case["img"], " ".join(["landmark"] * 200) + " ?"),
    "too many answer tokens": lambda t: t.lens.generate(t.case["img"], t.case["src"], max_new_tokens=10_000),
    "image over the byte limit": lambda t: t.limit(
        "max_image_bytes", 100, lambda: t.lens.generate(t.case["img"], t.case["src"])
    ),
    "image over the pixel limit": lambda t: t.lens.generate(_png((5000, 4000)), t.case["src"]),
    "unknown adapter": lambda t: t.lens.generate(t.case["img"], t.case["src"], adapter="nope"),
    "invalid adapter name": lambda t: t.lens.generate(t.case["img"], t.case["src"], adapter="no such/adapter"),
    "unknown version": lambda t: t.lens.generate(t.case["img"], t.case["src"], adapter="known", version=99),
    "unknown alias": lambda t: t.lens.generate(t.case["img"], t.case["src"], adapter="known", alias="golden"),
    "edit set of another base model": lambda t: t.lens.generate(t.case["img"], t.case["src"], adapter=t.foreign()),
    "corrupted safetensors in the registry": lambda t: t.lens.generate(
        t.case["img"], t.case["src"], adapter=t.corrupted()
    ),
    "garbage edit set in the registry": lambda t: t.lens.generate(t.case["img"], t.case["src"], adapter=t.garbage()),
    "constraint not in the question (edit)": lambda t: t.lens.edit(
        t.case["img"], t.case["src"], "this river", "x", adapter="bad", layer=0
    ),
    "constraint not in the question (diagnose)": lambda t: t.lens.diagnose(
        "trace", t.case["img"], t.case["src"], "this river"
    ),
    "edit without an image": lambda t: t.lens.edit(b"", t.case["src"], t.case["constraint"], "x", adapter="bad"),
    "edit with an empty answer": lambda t: t.lens.edit(
        t.case["img"], t.case["src"], t.case["constraint"], " ", adapter="bad"
    ),
    "edit layer out of range": lambda t: t.lens.edit(
        t.case["img"], t.case["src"], t.case["constraint"], t.case["ground_truth"], adapter="bad", layer=99
    ),
    "diagnose window out of range": lambda t: t.lens.diagnose(
        "knockout", t.case["img"], t.case["src"], t.case["constraint"], window=99
    ),
    "unknown knockout relation": lambda t: t.lens.diagnose(
        "knockout", t.case["img"], t.case["src"], t.case["constraint"], relations=["x->y"]
    ),
    "missing token for a mutation": lambda t: t.anon.edit(
        t.case["img"], t.case["src"], t.case["constraint"], "x", adapter="bad", layer=0
    ),
    "missing token for a rollback": lambda t: t.anon.rollback(adapter="known"),
    "wrong token for a mutation": lambda t: t.wrong.promote(1, adapter="known"),
    "wrong token for a delete": lambda t: t.wrong.delete(1, adapter="known"),
    "delete the live version": lambda t: t.lens.delete(1, adapter="known"),
    "rollback of an unknown adapter": lambda t: t.lens.rollback(adapter="never-made"),
    "visedit edit without a trained editor": lambda t: t.lens.edit(
        t.case["img"], t.case["src"], t.case["constraint"], t.case["ground_truth"], adapter="bad", editor="visedit"
    ),
    "visedit editor adapter without an editor": lambda t: t.lens.edit(
        t.case["img"],
        t.case["src"],
        t.case["constraint"],
        t.case["ground_truth"],
        adapter="bad",
        editor="visedit",
        editor_adapter="known",
    ),
    "unknown training option": lambda t: t.lens.train_visedit(adapter="bad", steps=1, nope=1),
    "bad training option value": lambda t: t.lens.train_visedit(adapter="bad", steps=1, batch_size=0),
    "unknown editor": lambda t: t.lens.edit(
        t.case["img"], t.case["src"], t.case["constraint"], t.case["ground_truth"], adapter="bad", editor="rome"
    ),
}
EXPECTED = {
    "undecodable image": (sdk.InvalidArgumentError, "cannot decode"),
    "empty prompt": (sdk.InvalidArgumentError, "prompt is empty"),
    "prompt over the token limit": (sdk.InvalidArgumentError, "the limit is"),
    "too many answer tokens": (sdk.InvalidArgumentError, "over the limit"),
    "image over the byte limit": (sdk.ResourceExhaustedError, "bytes; the limit is 100"),
    "image over the pixel limit": (sdk.ResourceExhaustedError, "pixels; the limit is"),
    "unknown adapter": (sdk.NotFoundError, "adapter 'nope' not found"),
    "invalid adapter name": (sdk.InvalidArgumentError, "invalid adapter name"),
    "unknown version": (sdk.NotFoundError, "no version 99"),
    "unknown alias": (sdk.NotFoundError, "no alias 'golden'"),
    "edit set of another base model": (sdk.FailedPreconditionError, "fingerprint"),
    "corrupted safetensors in the registry": (sdk.FailedPreconditionError, "corrupted"),
    "garbage edit set in the registry": (sdk.FailedPreconditionError, "failed validation"),
    "constraint not in the question (edit)": (sdk.InvalidArgumentError, "does not occur in the question"),
    "constraint not in the question (diagnose)": (sdk.InvalidArgumentError, "does not occur in the question"),
    "edit without an image": (sdk.InvalidArgumentError, "image is missing"),
    "edit with an empty answer": (sdk.InvalidArgumentError, "answer is empty"),
    "edit layer out of range": (sdk.InvalidArgumentError, "outside"),
    "diagnose window out of range": (sdk.InvalidArgumentError, "window"),
    "unknown knockout relation": (sdk.InvalidArgumentError, "unknown knockout relation"),
    "missing token for a mutation": (sdk.UnauthenticatedError, "needs a token"),
    "missing token for a rollback": (sdk.UnauthenticatedError, "needs a token"),
    "wrong token for a mutation": (sdk.PermissionDeniedError, "not valid"),
    "wrong token for a delete": (sdk.PermissionDeniedError, "not valid"),
    "delete the live version": (sdk.FailedPreconditionError, "is live"),
    "rollback of an unknown adapter": (sdk.NotFoundError, "not found"),
    "visedit edit without a trained editor": (sdk.InvalidArgumentError, "needs a trained VisEdit editor"),
    "visedit editor adapter without an editor": (sdk.FailedPreconditionError, "holds no visedit edit set"),
    "unknown training option": (sdk.InvalidArgumentError, "unknown training option 'nope'"),
    "bad training option value": (sdk.InvalidArgumentError, "batch_size must be at least 1"),
    "unknown editor": (sdk.InvalidArgumentError, "unknown editor 'rome'"),
}


class _Ctx:
    def __init__(self, svc, lens, anon, wrong, case, vlm, tmp_path):
        self.svc, self.lens, self.anon, self.wrong, self.case, self.vlm, self.tmp = (
            svc,
            lens,
            anon,
            wrong,
            case,
            vlm,
            tmp_path,
        )

    def limit(self, name, value, call):
        limits = self.svc.service.config.limits
        saved = getattr(limits, name)
        setattr(limits, name, value)
        try:
            return call()
        finally:
            setattr(limits, name, saved)

    def foreign(self):
        _register(self.svc, self.vlm, self.tmp, "foreign", fingerprint="0" * 32)
        return "foreign"

    def corrupted(self):
        _register(self.svc, self.vlm, self.tmp, "corrupt")
        _corrupt_artifact(self.svc, "corrupt")
        return "corrupt"

    def garbage(self):
        _register(self.svc, self.vlm, self.tmp, "garbage", raw=b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
        return "garbage"


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_status_and_the_server_goes_on(name, svc, lens, anon, case, vlm, known, tmp_path):
    with svc.client(token="wrong") as wrong:
        ctx = _Ctx(svc, lens, anon, wrong, case, vlm, tmp_path)
        before = {a: len(svc.registry.versions(a)) for a in svc.registry.adapters()}
        err_cls, message = EXPECTED[name]
        with pytest.raises(err_cls) as info:
            BAD[name](ctx)
        assert message in info.value.details, info.value.details
        assert "Traceback" not in info.value.details
        assert info.value.code == err_cls.code
        after = {a: len(svc.registry.versions(a)) for a in svc.registry.adapters()}
        assert {a: n for a, n in after.items() if a in before} == before  # nothing half-written
        assert "bad" not in after
        _serves(lens, case)
        assert lens.health() == "SERVING"


def test_a_rollback_on_one_replica_reaches_another(svc, lens, start_service, vlm, case, tmp_path):
    """Two servers on one registry: a rollback made through one is served by the other within its live
    cache time (0.5 s)."""
    _register(svc, vlm, tmp_path, "replicated")
    _register(svc, vlm, tmp_path, "replicated")  # version 2, live
    other = start_service(token=TOKEN, data_dir=svc.data_dir)
    with other.client() as b:
        assert b.generate(case["img"], case["src"], adapter="replicated").served.version == 2
        lens.rollback(adapter="replicated")
        t0 = time.monotonic()
        while b.generate(case["img"], case["src"], adapter="replicated").served.version != 1:
            assert time.monotonic() - t0 < 2.0, "the other replica still serves version 2"
            time.sleep(0.05)
        assert lens.generate(case["img"], case["src"], adapter="replicated").served.version == 1


@pytest.mark.numerics
@pytest.mark.slow
def test_visedit_train_edit_serve_and_carry_over(svc, lens, anon, case, vlm):
    """TrainVisEdit registers a trained editor; a VisEdit edit adds its signal to an adapter's live version
    beside the MultEdit deltas, and the version serves both."""
    events = []
    trained = lens.train_visedit(
        adapter="vis-editor",
        layer=0,
        steps=2,
        signal_layer=4,
        batch_size=2,
        per_entity=2,
        eval_every=2,
        checkpoint_every=2,
        progress=events.append,
    )
    assert {"queued", "train", "register"} <= {e.stage for e in events}
    assert trained.editors == ["visedit"] and trained.num_edits == 0 and "visedit.safetensors" in trained.files
    training = trained.manifest["training"]
    assert training["steps"] == 2 and training["adapter"]["layer"] == 0
    assert (
        training["layer_evidence"]["editor"] == "visedit" and "image_readout" in training["layer_evidence"]["details"]
    )

    a = "mixed"
    v1 = lens.edit(case["img"], case["src"], case["constraint"], case["ground_truth"], adapter=a, layer=0)
    v2 = lens.edit(
        case["img"],
        case["src"],
        case["constraint"],
        case["ground_truth"],
        adapter=a,
        editor="visedit",
        editor_adapter="vis-editor",
    )
    assert v2.parent == v1.version and v2.editors == ["keygate", "visedit"] and v2.num_edits == 2
    # a delta version: the VisEdit set is stored, the unchanged KeyGate set is v1's (inherited, not stored again)
    assert "visedit.safetensors" in v2.files and not any(f.startswith("keygate.") for f in v2.files)
    assert v2.manifest["delta_of"] == v1.version and v2.manifest["inherited"] == ["keygate"]
    rec = v2.edits[-1]
    assert rec.editor == "visedit" and rec.layer == 0 and "p_after" in rec.metrics
    full = v2.manifest["edits"][-1]
    assert full["hyperparameters"]["editor_adapter"] == "vis-editor"
    assert full["layer_evidence"]["editor"] == "visedit"
    # the KeyGate edit of v1 is carried into v2 as it was (the VisEdit set is added, not swapped in), and v2
    # answers as its two edit sets attached here do (what a 2-step adapter does to the answer is not asserted)
    from vlm import encode, generate

    bundles = svc.service.host.versions
    kept, carried = bundles.bundle(a, v1.version).edit_sets["keygate"], bundles.bundle(a, v2.version)
    assert sorted(carried.edit_sets) == ["keygate", "visedit"]
    assert torch.equal(carried.edit_sets["keygate"].gates[0].values, kept.gates[0].values)
    with carried.attached(vlm):
        want = generate(vlm, [encode(vlm.processor, case["src"], image=case["img"])])[0]
    g = anon.generate(case["img"], case["src"], adapter=a)
    assert g.served.version == v2.version and g.text == want
    assert anon.generate(case["img"], case["src"], adapter=a, version=1).text == case["ground_truth"]
