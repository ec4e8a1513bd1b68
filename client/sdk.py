"""The EditLens Python SDK: a typed client of the gRPC service (``editlens serve``).

    from client.sdk import EditLensClient

    with EditLensClient("127.0.0.1:50051", token="s3cret") as lens:
        lens.wait_ready()
        print(lens.generate("img.png", "which city is this landmark in ?").text)
        d = lens.diagnose("trace", "img.png", "which city is this landmark in ?", "this landmark", png=True)
        v = lens.edit("img.png", "which city is this landmark in ?", "this landmark", "paris",
                      progress=lambda p: print(p.stage, p.step, p.steps))
        lens.rollback()

Images are a path, bytes or a PIL image. Every failure of a call raises an
``EditLensError`` subclass that carries the gRPC status code (``.code``) and
the server's message. This module needs only grpcio, the generated stubs and
(for PIL images) Pillow: no torch, no model code.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from editlens.v1 import editlens_pb2 as pb
from editlens.v1 import editlens_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ImageLike = str | os.PathLike | bytes | bytearray | Any  # Any: a PIL.Image.Image
#: the diagnostics by name ("noise-trace") -> the contract's enum value (DIAGNOSTIC_NOISE_TRACE)
DIAGNOSTICS = {
    v.name.removeprefix("DIAGNOSTIC_").lower().replace("_", "-"): v.number
    for v in pb.Diagnostic.DESCRIPTOR.values
    if v.number
}
DIAGNOSTIC_NAMES = {v: k for k, v in DIAGNOSTICS.items()}


# ------------------------------------------------------------------- errors
class EditLensError(Exception):
    """A call failed; ``code`` is the gRPC status code, ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None):
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgumentError(EditLensError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(EditLensError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(EditLensError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(EditLensError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(EditLensError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(EditLensError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(EditLensError):
    code = grpc.StatusCode.UNAVAILABLE


class UnimplementedError(EditLensError):
    code = grpc.StatusCode.UNIMPLEMENTED


class CancelledError(EditLensError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceededError(EditLensError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(EditLensError):
    code = grpc.StatusCode.INTERNAL


class AbortedError(EditLensError):
    """The registry changed under the call (another replica made a version live first): retry it."""

    code = grpc.StatusCode.ABORTED


_ERRORS = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        UnimplementedError,
        CancelledError,
        DeadlineExceededError,
        InternalError,
        AbortedError,
    )
}


def error_from_rpc(err: grpc.RpcError) -> EditLensError:
    """The ``EditLensError`` subclass of a failed call's status code, with the server's message."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    cls = _ERRORS.get(code, EditLensError)
    return cls(details, code) if cls is EditLensError else cls(details)


# -------------------------------------------------------------------- types
@dataclass
class Served:
    """The version that served a request (version 0: the base model)."""

    adapter: str
    version: int
    alias: str = ""

    @classmethod
    def from_pb(cls, m: pb.Served) -> Served:
        return cls(m.adapter, m.version, m.alias)


@dataclass
class Generation:
    text: str
    served: Served
    prompt_tokens: int
    answer_tokens: int
    seconds: float


@dataclass
class Progress:
    stage: str
    step: int = 0
    steps: int = 0
    item: int = 0
    items: int = 0
    loss: float | None = None
    message: str = ""
    queue_position: int = 0
    elapsed_seconds: float = 0.0

    @classmethod
    def from_pb(cls, m: pb.Progress) -> Progress:
        return cls(
            m.stage,
            m.step,
            m.steps,
            m.item,
            m.items,
            m.loss if m.HasField("loss") else None,
            m.message,
            m.queue_position,
            m.elapsed_seconds,
        )


@dataclass
class LayerRecommendation:
    editor: str
    layer: int
    scores: list[float]
    candidates: list[int]
    criterion: str
    cases: int
    localised: bool = True  # False: every score negligible; ``layer`` is only an auto edit's fallback

    @classmethod
    def from_pb(cls, m: pb.LayerRecommendation) -> LayerRecommendation:
        return cls(m.editor, m.layer, list(m.scores), list(m.candidates), m.criterion, m.cases, not m.nothing_localised)


@dataclass
class EditCheck:
    """One prompt the edit's request supplied, asked of the version the edit made."""

    kind: str  # edit | rephrase | image_rephrase
    question: str
    answered: bool  # greedy decoding gives the edit's answer
    p_answer: float
    got: str  # what the version answers

    @classmethod
    def from_pb(cls, m: pb.EditCheck) -> EditCheck:
        return cls(m.kind, m.question, m.answered, m.p_answer, m.got)


@dataclass
class EditRecord:
    editor: str
    layer: int
    question: str
    constraint: str
    answer: str
    metrics: dict[str, float]
    layer_evidence: LayerRecommendation | None
    version: int
    checks: list[EditCheck] = field(default_factory=list)  # empty for edits registered before the checks existed

    @classmethod
    def from_pb(cls, m: pb.EditRecord) -> EditRecord:
        ev = LayerRecommendation.from_pb(m.layer_evidence) if m.HasField("layer_evidence") else None
        checks = [EditCheck.from_pb(c) for c in m.checks]
        return cls(m.editor, m.layer, m.question, m.constraint, m.answer, dict(m.metrics), ev, m.version, checks)


@dataclass
class Version:
    adapter: str
    version: int
    aliases: list[str]
    live: bool
    parent: int | None
    base_fingerprint: str
    editors: list[str]
    num_edits: int
    created: float  # unix seconds
    description: str
    edits: list[EditRecord]
    files: list[str]
    manifest: dict[str, Any]
    figures: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, m: pb.Version) -> Version:
        try:
            manifest = json.loads(m.manifest_json) if m.manifest_json else {}
        except json.JSONDecodeError:
            manifest = {}
        return cls(
            m.adapter,
            m.version,
            list(m.aliases),
            m.live,
            m.parent or None,
            m.base_fingerprint,
            list(m.editors),
            m.num_edits,
            m.created_unix_ms / 1000.0,
            m.description,
            [EditRecord.from_pb(e) for e in m.edits],
            list(m.files),
            manifest,
            {f.name: f.png for f in m.figures},
        )

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["figures"] = sorted(self.figures)
        return d


@dataclass
class VersionList:
    adapter: str
    versions: list[Version]  # newest first
    aliases: dict[str, int]
    live_version: int | None


@dataclass
class AdapterSummary:
    name: str
    live_version: int | None
    latest_version: int
    num_versions: int


@dataclass
class Matrix:
    """Numbers with labels; ``values`` is rows x cols."""

    name: str
    values: list[list[float]]
    row_labels: list[str]
    col_labels: list[str]

    @classmethod
    def from_pb(cls, m: pb.Matrix) -> Matrix:
        vals = list(m.values)
        rows = [vals[i * m.cols : (i + 1) * m.cols] for i in range(m.rows)]
        return cls(m.name, rows, list(m.row_labels), list(m.col_labels))


@dataclass
class Diagnosis:
    diagnostic: str
    served: Served
    values: dict[str, Matrix]
    scalars: dict[str, float]
    recommended_layer: int | None
    recommendations: list[LayerRecommendation]
    lines: list[str]
    data: dict[str, Any]
    figures: dict[str, bytes]
    seconds: float

    @property
    def png(self) -> bytes | None:
        """The (first) figure as PNG bytes, or None when none was asked for."""
        return next(iter(self.figures.values()), None)

    @classmethod
    def from_pb(cls, m: pb.DiagnoseResult) -> Diagnosis:
        try:
            data = json.loads(m.data_json) if m.data_json else {}
        except json.JSONDecodeError:
            data = {}
        return cls(
            DIAGNOSTIC_NAMES.get(m.diagnostic, str(m.diagnostic)),
            Served.from_pb(m.served),
            {x.name: Matrix.from_pb(x) for x in m.values},
            dict(m.scalars),
            m.recommended_layer if m.HasField("recommended_layer") else None,
            [LayerRecommendation.from_pb(r) for r in m.recommendations],
            list(m.lines),
            data,
            {f.name: f.png for f in m.figures},
            m.seconds,
        )


@dataclass
class ServerInfo:
    version: str
    ready: bool
    model_path: str
    base_fingerprint: str
    num_layers: int
    device: str
    dtype: str
    default_adapter: str
    auth_required: bool
    limits: dict[str, int]
    registry_uri: str
    editors: list[str]
    jobs_running: int
    jobs_queued: int


@dataclass
class JobInfo:
    """A queued or running job of the server (``EditLensClient.jobs``)."""

    id: int
    kind: str  # edit | train | diagnose
    adapter: str
    state: str  # queued | running (done | failed | cancelled once it ended)
    cancelling: bool  # cancelled, stopping at its next progress report
    stage: str
    step: int
    steps: int
    seconds: float  # since the server accepted it
    peer: str

    @classmethod
    def from_pb(cls, m: pb.JobInfo) -> JobInfo:
        return cls(m.id, m.kind, m.adapter, m.state, m.cancelling, m.stage, m.step, m.steps, m.seconds, m.peer)


# ------------------------------------------------------------------ helpers
def image_bytes(image: ImageLike | None) -> bytes:
    """A path, bytes or PIL image as encoded image bytes (PIL images are sent as PNG)."""
    if image is None:
        return b""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InvalidArgumentError(f"image file not found: {path}")
        return path.read_bytes()
    if hasattr(image, "save") and hasattr(image, "size"):  # PIL.Image.Image, without importing PIL
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise InvalidArgumentError(f"unsupported image type {type(image).__name__}; give a path, bytes or a PIL image")


def adapter_ref(
    adapter: str | None = None, version: int | None = None, alias: str | None = None, base: bool = False
) -> pb.AdapterRef:
    """An ``AdapterRef``: the adapter and at most one of a version, an alias or the base model."""
    given = sum(x is not None and x is not False for x in (version, alias, base or None))
    if given > 1:
        raise InvalidArgumentError("give at most one of version, alias and base")
    ref = pb.AdapterRef(adapter=adapter or "")
    if version is not None:
        ref.version = int(version)
    elif alias is not None:
        ref.alias = alias
    elif base:
        ref.base = True
    return ref


def _set_fields(message, values: dict[str, Any], what: str) -> None:
    """Set ``message``'s fields by name; an unknown name is an ``InvalidArgumentError`` that lists the known."""
    fields = message.DESCRIPTOR.fields_by_name
    for name, value in values.items():
        if name not in fields:
            raise InvalidArgumentError(f"unknown {what} {name!r}; known: {', '.join(sorted(fields))}")
        try:
            setattr(message, name, value)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"{what} {name}={value!r}: {exc}") from None


def _fill_options(req: pb.EditRequest, editor: str, options: dict[str, Any]) -> None:
    """Put an editor's options into the request's options message named after the editor, or (an editor the
    contract has no message for) into ``editor_options``, where the server checks them."""
    field = pb.EditRequest.DESCRIPTOR.fields_by_name.get(editor)
    if field is None or field.message_type is None or editor == "editor_options":
        req.editor_options.update(options)
        return
    _set_fields(getattr(req, editor), options, f"{editor} option")


def _pem(value: str | os.PathLike | bytes | None, what: str) -> bytes | None:
    """PEM bytes given as bytes or as a file path."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {value} ({exc.strerror or exc})") from None


# ------------------------------------------------------------------- client
class EditLensClient:
    """A client of one EditLens server (``host:port``).

    ``token``: sent as ``authorization: Bearer <token>`` (needed for edit,
    promote, rollback and delete when the server has one). ``timeout``:
    seconds per unary call (streaming jobs run until they finish unless
    ``job_timeout`` is set). ``tls_ca``: talk TLS, trusting the server
    certificates this PEM CA (a path or bytes) signed; with ``tls_cert`` and
    ``tls_key`` present this client's own certificate (mutual TLS).
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        timeout: float | None = 60.0,
        job_timeout: float | None = None,
        max_message_bytes: int = 64 << 20,
        tls_ca: str | os.PathLike | bytes | None = None,
        tls_cert: str | os.PathLike | bytes | None = None,
        tls_key: str | os.PathLike | bytes | None = None,
    ):
        self.target = target
        self.token = token
        self.timeout = timeout
        self.job_timeout = job_timeout
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a client certificate needs both tls_cert and tls_key")
        if tls_cert is not None and tls_ca is None:
            raise ValueError("a client certificate (mutual TLS) needs tls_ca, the CA of the server's certificate")
        if tls_ca is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca, "tls_ca"),
                private_key=_pem(tls_key, "tls_key"),
                certificate_chain=_pem(tls_cert, "tls_cert"),
            )
            self._channel = grpc.secure_channel(target, creds, options=options)
        self._stub = pb_grpc.EditLensStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # context manager / lifetime
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EditLensClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _metadata(self):
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def _unary(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout, metadata=self._metadata())
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def _stream(self, method, request, on_progress, result_field: str = "result"):
        call = method(request, timeout=self.job_timeout, metadata=self._metadata())
        result = None
        try:
            for event in call:
                kind = event.WhichOneof("event")
                if kind == "progress":
                    if on_progress is not None:
                        on_progress(Progress.from_pb(event.progress))
                elif kind == result_field:
                    result = getattr(event, result_field)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        except BaseException:
            call.cancel()
            raise
        if result is None:
            raise InternalError("the server closed the stream without a result")
        return result

    # ------------------------------------------------------------ health
    def health(self, service: str = "") -> str:
        """The health status: SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
        try:
            r = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_ready(self, timeout: float = 600.0, interval: float = 0.2) -> ServerInfo:
        """Wait until the server reports SERVING (the model is loaded); returns its info."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self.health() == "SERVING":
                    return self.info()
            except (UnavailableError, DeadlineExceededError) as exc:
                last = exc
            time.sleep(interval)
        raise UnavailableError(
            f"the server at {self.target} was not ready within {timeout:g} s"
            + (f" ({last.details})" if isinstance(last, EditLensError) else "")
        )

    def info(self) -> ServerInfo:
        """The server's ``ServerInfo``: model, limits, editors, jobs."""
        m = self._unary(self._stub.GetServerInfo, pb.GetServerInfoRequest())
        lim = m.limits
        return ServerInfo(
            m.version,
            m.ready,
            m.model_path,
            m.base_fingerprint,
            m.num_layers,
            m.device,
            m.dtype,
            m.default_adapter,
            m.auth_required,
            {f.name: getattr(lim, f.name) for f in lim.DESCRIPTOR.fields},
            m.registry_uri,
            list(m.editors),
            m.jobs_running,
            m.jobs_queued,
        )

    def jobs(self) -> list[JobInfo]:
        """The server's queued and running jobs (edits, training, diagnostics), oldest first. Needs the token."""
        return [JobInfo.from_pb(j) for j in self._unary(self._stub.ListJobs, pb.ListJobsRequest()).jobs]

    def cancel_job(self, job_id: int) -> JobInfo:
        """Cancel a queued or running job: it registers nothing and its client gets CANCELLED (a job already
        registering its version finishes). ``NotFoundError`` when no such job is queued or running."""
        return JobInfo.from_pb(self._unary(self._stub.CancelJob, pb.CancelJobRequest(id=int(job_id))))

    # -------------------------------------------------------- generation
    def _generate_request(self, image, prompt, adapter, version, alias, base, max_new_tokens):
        return pb.GenerateRequest(
            image=image_bytes(image),
            prompt=prompt,
            adapter=adapter_ref(adapter, version, alias, base),
            max_new_tokens=max_new_tokens or 0,
        )

    def generate(
        self,
        image: ImageLike | None,
        prompt: str,
        adapter: str | None = None,
        version: int | None = None,
        alias: str | None = None,
        base: bool = False,
        max_new_tokens: int | None = None,
    ) -> Generation:
        """Greedy answer to ``prompt`` about ``image`` with the adapter's live version (or the version,
        alias or base model given)."""
        m = self._unary(
            self._stub.Generate, self._generate_request(image, prompt, adapter, version, alias, base, max_new_tokens)
        )
        return Generation(m.text, Served.from_pb(m.served), m.prompt_tokens, m.answer_tokens, m.seconds)

    def generate_stream(
        self,
        image: ImageLike | None,
        prompt: str,
        adapter: str | None = None,
        version: int | None = None,
        alias: str | None = None,
        base: bool = False,
        max_new_tokens: int | None = None,
    ) -> Iterator[str]:
        """The answer as it is generated, piece by piece."""
        call = self._stub.GenerateStream(
            self._generate_request(image, prompt, adapter, version, alias, base, max_new_tokens),
            timeout=self.job_timeout,
            metadata=self._metadata(),
        )
        try:
            for chunk in call:
                if chunk.text:
                    yield chunk.text
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()

    # ------------------------------------------------------------- edits
    def edit(
        self,
        image: ImageLike,
        question: str,
        constraint: str,
        answer: str,
        adapter: str | None = None,
        editor: str = "keygate",
        layer: int | str = "auto",
        rephrase: str | None = None,
        image_rephrase: ImageLike | None = None,
        promote: bool = True,
        description: str = "",
        progress: Callable[[Progress], None] | None = None,
        strict: bool = False,
        keep_unreached: bool = False,
        **options: Any,
    ) -> Version:
        """Edit the served model: the new version of ``adapter`` (registered; live unless ``promote=False``).

        The server asks the new version the request's own prompts (the question on the image, the rephrase, the
        question on the image rephrase; ``Version.edits[-1].checks``). An edit that misses its own answer is
        refused (``EditLensError`` FAILED_PRECONDITION with the figures; nothing registered) unless
        ``keep_unreached`` (registered, not made live); ``strict`` refuses one that misses a variant too.

        ``editor``: any editor the server runs (``info().editors``: keygate — the default —, alphaedit,
        multedit, visedit, ft, ...).
        ``layer``: "auto" (the causal trace chooses; evidence in the manifest) or a decoder layer.
        ``options``: the editor's settings by name, e.g. KeyGate's steps, lr, threshold, same_subject_cos,
        MultEdit's steps, lr, lam, max_norm, target_prob, lr_scale, or FT-L's steps, lr, max_change, target_prob
        (the fields of the contract's options message named after the editor; unset ones take the server's
        defaults); VisEdit's name its trained editor: ``editor_adapter`` (the adapter that holds it) and
        ``editor_version`` (default: that adapter's live version).
        ``progress`` is called with every ``Progress`` event of the job.
        """
        req = pb.EditRequest(
            adapter=adapter or "",
            editor_name=editor,
            image=image_bytes(image),
            question=question,
            constraint=constraint,
            answer=answer,
            rephrase=rephrase or "",
            image_rephrase=image_bytes(image_rephrase),
            no_promote=not promote,
            description=description,
            strict=strict,
            keep_unreached=keep_unreached,
        )
        if f"EDITOR_{editor.upper()}" in pb.Editor.keys():  # servers that predate editor_name read the enum
            req.editor = pb.Editor.Value(f"EDITOR_{editor.upper()}")
        if layer != "auto":
            try:
                options["layer"] = int(layer)
            except (TypeError, ValueError):
                raise InvalidArgumentError(f"layer must be a layer number or 'auto', not {layer!r}") from None
        _fill_options(req, editor, {k: v for k, v in options.items() if v is not None})
        return Version.from_pb(self._stream(self._stub.Edit, req, progress))

    def train_visedit(
        self,
        adapter: str | None = None,
        cases_path: str = "",
        layer: int | None = None,
        steps: int = 0,
        promote: bool = True,
        progress: Callable[[Progress], None] | None = None,
        **options: Any,
    ) -> Version:
        """Train a VisEdit editor on the server (a job) and register it as a version of ``adapter`` (default
        "visedit"). ``options``: the trainer's settings by name (the fields of ``VisEditTrainOptions``: lr,
        width, heads, synthetic, batch_size, seed, mapper_tied, synthetic_locality, per_entity, eval_every,
        checkpoint_every, im_tokens, signal_layer)."""
        req = pb.TrainVisEditRequest(adapter=adapter or "", cases_path=cases_path, steps=steps, no_promote=not promote)
        if layer is not None:
            req.layer = layer
        _set_fields(req.train, {k: v for k, v in options.items() if v is not None}, "training option")
        return Version.from_pb(self._stream(self._stub.TrainVisEdit, req, progress))

    # ---------------------------------------------------------- versions
    def adapters(self) -> list[AdapterSummary]:
        """Every adapter with its live and latest version."""
        m = self._unary(self._stub.ListAdapters, pb.ListAdaptersRequest())
        return [AdapterSummary(a.name, a.live_version or None, a.latest_version, a.num_versions) for a in m.adapters]

    def versions(self, adapter: str | None = None, page_size: int = 0) -> VersionList:
        """Every version of the adapter, newest first, with its aliases, fetched page by page (``page_size``
        per call; 0: the server's default). Each is a summary: ``edits`` and ``manifest`` are empty —
        ``version(n)`` gives one version whole."""
        found: list[Version] = []
        token = ""
        while True:
            req = pb.ListVersionsRequest(adapter=adapter or "", page_size=page_size, page_token=token)
            m = self._unary(self._stub.ListVersions, req)
            found += [Version.from_pb(v) for v in m.versions]
            token = m.next_page_token
            if not token:
                return VersionList(m.adapter, found, dict(m.aliases), m.live_version or None)

    def version(
        self, version: int | None = None, adapter: str | None = None, alias: str | None = None, figures: bool = False
    ) -> Version:
        """One version (by number, alias, or the live one), with its figures when asked."""
        req = pb.GetVersionRequest(adapter=adapter or "", include_figures=figures)
        if version is not None:
            req.version = int(version)
        elif alias is not None:
            req.alias = alias
        return Version.from_pb(self._unary(self._stub.GetVersion, req))

    def promote(self, version: int, adapter: str | None = None, alias: str = "live") -> Version:
        """Point ``alias`` (default live) at ``version``."""
        return Version.from_pb(
            self._unary(
                self._stub.SetAlias, pb.SetAliasRequest(adapter=adapter or "", version=int(version), alias=alias)
            )
        )

    def rollback(self, adapter: str | None = None, to: int | None = None) -> Version | None:
        """Move live back (to the version live before, or to ``to``); returns the version now live,
        or None when the adapter's first version was rolled back (the base model answers again)."""
        m = self._unary(self._stub.Rollback, pb.RollbackRequest(adapter=adapter or "", to_version=int(to or 0)))
        return Version.from_pb(m.live) if m.HasField("live") else None

    def delete(self, version: int, adapter: str | None = None) -> None:
        """Delete a version that is not live and that no delta version builds on (FAILED_PRECONDITION otherwise:
        ``editlens registry squash`` stores a delta version whole)."""
        self._unary(self._stub.DeleteVersion, pb.DeleteVersionRequest(adapter=adapter or "", version=int(version)))

    # ------------------------------------------------------- diagnostics
    def diagnose(
        self,
        diagnostic: str,
        image: ImageLike,
        question: str,
        constraint: str,
        answer: str | None = None,
        png: bool = False,
        adapter: str | None = None,
        version: int | None = None,
        alias: str | None = None,
        base: bool = False,
        rephrase: str | None = None,
        image_rephrase: ImageLike | None = None,
        progress: Callable[[Progress], None] | None = None,
        **options: Any,
    ) -> Diagnosis:
        """Run one diagnostic (trace, noise-trace, knockout, contributions, module-attribution,
        visual-attribution, recommend) on one case; numbers with labels, the recommended layer and,
        with ``png=True``, the figure(s). ``options``: kinds, window, isolate, replacement, relations,
        layers, samples, noise_scale, seed, editor, image_block."""
        if diagnostic not in DIAGNOSTICS:
            raise InvalidArgumentError(f"unknown diagnostic {diagnostic!r}; choose from {', '.join(DIAGNOSTICS)}")
        opts = pb.DiagnoseOptions()
        for name, value in options.items():
            if value is None:
                continue
            if name not in pb.DiagnoseOptions.DESCRIPTOR.fields_by_name:
                raise InvalidArgumentError(f"unknown diagnose option {name!r}")
            if isinstance(value, (list, tuple)):
                getattr(opts, name).extend(value)
            else:
                setattr(opts, name, value)
        req = pb.DiagnoseRequest(
            diagnostic=DIAGNOSTICS[diagnostic],
            image=image_bytes(image),
            question=question,
            constraint=constraint,
            answer=answer or "",
            rephrase=rephrase or "",
            image_rephrase=image_bytes(image_rephrase),
            adapter=adapter_ref(adapter, version, alias, base),
            options=opts,
            png=png,
        )
        return Diagnosis.from_pb(self._stream(self._stub.Diagnose, req, progress))


__all__ = [
    "EditLensClient",
    "EditLensError",
    "InvalidArgumentError",
    "NotFoundError",
    "FailedPreconditionError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "PermissionDeniedError",
    "UnavailableError",
    "UnimplementedError",
    "CancelledError",
    "DeadlineExceededError",
    "InternalError",
    "Served",
    "Generation",
    "Progress",
    "LayerRecommendation",
    "EditCheck",
    "EditRecord",
    "JobInfo",
    "Version",
    "VersionList",
    "AdapterSummary",
    "Matrix",
    "Diagnosis",
    "ServerInfo",
    "image_bytes",
    "adapter_ref",
]
