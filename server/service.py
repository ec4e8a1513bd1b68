"""The EditLens gRPC servicer: each RPC checks its request and calls the module that does the work.

How a request is served:

* the model is loaded once (``server.app`` hands it over, ``Host``); every
  version of every adapter is applied to it per request (``Bundle.attached``:
  thread-scoped forward hooks, and row-scoped in a batch), so generation of
  different versions, an edit job and a diagnostic run at the same time on the
  same weights, which are never copied or reloaded; concurrent generation
  requests are decoded together, one forward pass per step
  (``server.batching``), each row with its own version's edits;
* a request resolves its version once (``server.versions``: the live alias
  through a cache at most ``live_ttl`` old, or the version/alias it names) and
  uses that version for the whole request, so an answer never mixes two;
* edits, training and diagnostics are jobs (``server.jobs``) that stream their
  progress (``server.editing``, ``server.diagnosing``), edits and training in
  one queue, diagnostics (open to every caller) in another, so reads cannot
  starve writes; generation (``server.generation``) is served while they run;
* every error becomes a status code with a readable message (``server.errors``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from editlens.v1 import editlens_pb2 as pb
from editlens.v1 import editlens_pb2_grpc as pb_grpc

from editors import editor_names
from registry import LIVE, NotFoundError, RegistryError

from . import convert, diagnosing, editing, generation
from .auth import caller, check_token, token_valid
from .bundles import BundleError
from .config import ServerConfig
from .errors import JobCancelled, invalid, not_found, rpc, status_for, unavailable
from .host import Host
from .jobs import JobRunner, follow
from .metrics import Metrics

log = logging.getLogger("editlens.server")


def _job_events(job, ahead: int, context, event, what: str):
    """The events of a submitted job as ``event`` messages: queued, its progress, then its result.

    The job is bound to the RPC before anything is sent: an RPC that has ended already (a client that
    cancelled at once) or that ends at any point later — while the first event is on its way included —
    cancels the job, and a cancelled job registers nothing (its last check is just before registration,
    the point of no return: ``server.editing``)."""
    if not context.add_callback(job.cancel) or not context.is_active():
        job.cancel()  # the RPC terminated before the callback could be added: it would never run
    try:
        yield event(
            progress=pb.Progress(
                stage="queued",
                queue_position=ahead,
                message=f"{what} job {job.id} accepted" + (f"; {ahead} job(s) ahead" if ahead else ""),
            )
        )
        events = follow(job, context)
        while True:
            try:
                ev = next(events)
            except StopIteration as done:
                yield event(result=done.value)
                return
            yield event(progress=convert.progress(ev))
    finally:
        if job.state in ("queued", "running"):  # the stream ended before the job did: nobody reads it
            job.cancel()


class EditLensService(pb_grpc.EditLensServicer):
    """The servicer of ``editlens.v1.EditLens``; ``set_ready`` hands it the loaded model and registry."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.host: Host | None = None
        self.state = "starting"  # starting | loading | ready | failed
        self.state_detail = ""
        # two queues: diagnostics (open to every caller) can never fill the queue of edits and training
        limits, ids = config.limits, itertools.count(1)  # one numbering of jobs across both queues (ListJobs)
        self.jobs = JobRunner(config.job_workers, limits.max_queued_jobs, limits.max_job_seconds, ids)
        self.diagnoses = JobRunner(config.job_workers, limits.max_queued_jobs, limits.max_job_seconds, ids)
        self.metrics = Metrics(self) if config.metrics_port is not None else None  # serve --metrics-port

    # ------------------------------------------------------------ lifecycle
    def set_ready(self, vlm, registry) -> None:
        self.host = Host.create(vlm, registry, self.config, self.metrics.batch_size.observe if self.metrics else None)
        self.state, self.state_detail = "ready", ""

    def set_loading(self, detail: str) -> None:
        """What the server is doing before it is ready (UNAVAILABLE answers say it)."""
        self.state, self.state_detail = "loading", detail

    def set_failed(self, detail: str) -> None:
        self.state, self.state_detail = "failed", detail

    def close(self) -> None:
        self.jobs.close()
        self.diagnoses.close()
        if self.host is not None:
            self.host.close()

    def _ready(self) -> Host:
        if self.host is None:
            if self.state == "failed":
                raise unavailable(f"the server could not load its model: {self.state_detail}")
            raise unavailable(
                "the model is not loaded yet ("
                + (self.state_detail or self.state)
                + "); the health service reports SERVING once it is"
            )
        return self.host

    def _mutating(self, context) -> Host:
        check_token(self.config.token, context)
        return self._ready()

    @contextmanager
    def _holding(self, adapter: str, context, what: str) -> Iterator[None]:
        """The adapter's lock for a mutation of this RPC: a bounded wait (ABORTED naming the running job), and
        nothing done for a client that went away while it waited."""
        with self.jobs.holding(adapter, self.config.mutation_wait_s, what):
            if not context.is_active():
                raise JobCancelled(f"the client went away while {what} waited; nothing was done")
            yield

    def _counted(self, plan: editing.EditPlan, run):
        """Run an edit, counting its outcome in the metrics (registered, or the refusal's status code)."""
        try:
            info = run()
        except Exception as exc:
            if self.metrics is not None:
                self.metrics.edits.labels(plan.adapter, plan.spec.name, status_for(exc)[0].name).inc()
            raise
        if self.metrics is not None:
            self.metrics.edits.labels(plan.adapter, plan.spec.name, "registered").inc()
        return info

    @staticmethod
    def _version(host: Host, info, **options) -> pb.Version:
        """A version as the client sees it: a delta version with its lineage's edits (``Versions.manifest``)."""
        return convert.version(info, manifest=host.versions.manifest(info), **options)

    def _audit(self, host: Host, adapter: str, context, action: str, **what) -> None:
        """Record a mutation of ``adapter`` with its time and caller (registry tags ``editlens.audit.*``)."""
        host.registry.audit(adapter, {"action": action, **what, **caller(context, bool(self.config.token))})

    # ------------------------------------------------------------ generate
    @rpc
    def Generate(self, request, context):
        t0 = time.perf_counter()
        host = self._ready()
        plan = generation.start_generation(host, request)
        text, tokens = generation.generate(host, plan, context)
        return pb.GenerateResponse(
            text=text,
            served=plan.served,
            prompt_tokens=plan.prompt.length,
            answer_tokens=tokens,
            seconds=time.perf_counter() - t0,
        )

    @rpc
    def GenerateStream(self, request, context):
        host = self._ready()
        plan = generation.start_generation(host, request)
        yield from generation.stream(host, plan, context)

    # ---------------------------------------------------------------- jobs
    @rpc
    def Edit(self, request, context):
        host = self._mutating(context)
        plan = editing.plan_edit(host, request)
        plan.caller = caller(context, bool(self.config.token))
        job, ahead = self.jobs.submit(
            "edit",
            lambda job: self._version(host, self._counted(plan, lambda: editing.run_edit(host, job, plan))),
            adapter=plan.adapter,
            peer=context.peer() or "",
        )
        yield from _job_events(job, ahead, context, pb.EditEvent, "edit")

    @rpc
    def TrainVisEdit(self, request, context):
        host = self._mutating(context)
        plan = editing.plan_training(host, request)
        plan.caller = caller(context, bool(self.config.token))
        job, ahead = self.jobs.submit(
            "train",
            lambda job: convert.version(editing.run_training(host, job, plan)),
            adapter=plan.adapter,
            peer=context.peer() or "",
        )
        yield from _job_events(job, ahead, context, pb.TrainEvent, "training")

    @rpc
    def Diagnose(self, request, context):
        host = self._ready()
        plan = diagnosing.plan_diagnose(host, request)
        job, ahead = self.diagnoses.submit(
            "diagnose", lambda job: diagnosing.run_diagnose(host, job, plan), peer=context.peer() or ""
        )
        yield from _job_events(job, ahead, context, pb.DiagnoseEvent, plan.name)

    # ------------------------------------------------------------ versions
    @rpc
    def ListAdapters(self, request, context):
        host = self._ready()
        out = pb.ListAdaptersResponse(default_adapter=self.config.default_adapter)
        for name in host.registry.adapters():
            versions = host.registry.versions(name)
            out.adapters.append(convert.adapter_summary(name, versions))
        return out

    @rpc
    def ListVersions(self, request, context):
        host = self._ready()
        adapter = host.versions.adapter_name(request.adapter)
        try:
            infos = host.registry.versions(adapter)
        except NotFoundError:
            if request.adapter and request.adapter != self.config.default_adapter:
                raise
            infos = []  # the default adapter before its first edit
        return convert.version_list(adapter, infos, request.page_size, request.page_token)

    @rpc
    def GetVersion(self, request, context):
        host = self._ready()
        adapter = host.versions.adapter_name(request.adapter)
        which = request.WhichOneof("ref")
        if which == "version" and request.version < 1:
            raise invalid("a version number is >= 1")
        info = host.registry.version(adapter, getattr(request, which) if which else LIVE)
        audit = token_valid(self.config.token, context)  # who made it, from where: for token holders only
        if not request.include_figures:
            return self._version(host, info, audit=audit)
        try:
            folder = host.registry.download(adapter, info.version)
        except RegistryError as exc:
            raise BundleError(f"adapter '{adapter}' version {info.version}: cannot read its files: {exc}") from None
        return self._version(host, info, figures_from=folder, audit=audit)

    @rpc
    def SetAlias(self, request, context):
        host = self._mutating(context)
        adapter = host.versions.adapter_name(request.adapter)
        if request.version < 1:
            raise invalid("name the version to point the alias at (>= 1)")
        with self._holding(adapter, context, "SetAlias"):
            info = host.registry.set_alias(adapter, request.alias or LIVE, request.version)
            self._audit(host, adapter, context, "set_alias", alias=request.alias or LIVE, version=request.version)
        host.versions.forget(adapter)
        return self._version(host, info)

    @rpc
    def Rollback(self, request, context):
        host = self._mutating(context)
        adapter = host.versions.adapter_name(request.adapter)
        with self._holding(adapter, context, "Rollback"):
            before = host.registry.live_version_number(adapter)
            # the adapter's first version rolls back to no live version: the base model answers again
            info = host.registry.rollback(adapter, request.to_version or None, to_base=True)
            self._audit(host, adapter, context, "rollback", previous=before or 0, live=info.version if info else 0)
        host.versions.forget(adapter)
        return pb.RollbackResponse(previous_version=before or 0, live=self._version(host, info) if info else None)

    @rpc
    def DeleteVersion(self, request, context):
        host = self._mutating(context)
        adapter = host.versions.adapter_name(request.adapter)
        if request.version < 1:
            raise invalid("name the version to delete (>= 1)")
        with self._holding(adapter, context, "DeleteVersion"):
            host.registry.delete_version(adapter, request.version)
            self._audit(host, adapter, context, "delete_version", version=request.version)
        host.versions.dropped(adapter, request.version)
        return pb.DeleteVersionResponse(adapter=adapter, version=request.version)

    # -------------------------------------------------------------- info
    @rpc
    def GetServerInfo(self, request, context):
        running, queued = self.jobs.running + self.diagnoses.running, self.jobs.queued + self.diagnoses.queued
        return convert.server_info(self.config, self.host, editor_names(), running, queued)

    # -------------------------------------------------------------- jobs
    @rpc
    def ListJobs(self, request, context):
        check_token(self.config.token, context)
        jobs = sorted(self.jobs.jobs() + self.diagnoses.jobs(), key=lambda j: j.id)
        return pb.ListJobsResponse(jobs=[convert.job_info(j) for j in jobs])

    @rpc
    def CancelJob(self, request, context):
        check_token(self.config.token, context)
        job = self.jobs.find(request.id) or self.diagnoses.find(request.id)
        if job is None:
            raise not_found(f"no queued or running job {request.id} (ListJobs lists them)")
        job.cancel()
        log.info("job %s (%s) cancelled by %s", job.id, job.kind, context.peer())
        return convert.job_info(job)
