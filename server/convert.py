"""Between the server's Python objects and the wire messages of ``editlens.v1``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from editlens.v1 import editlens_pb2 as pb


def _diagnostic_names() -> dict[int, str]:
    """Diagnostic enum value -> the name ``diagnostics.report`` runs it by: DIAGNOSTIC_NOISE_TRACE ->
    "noise-trace" (the contract's enum is the list; a test checks it matches ``diagnostics.report``)."""
    return {
        v.number: v.name.removeprefix("DIAGNOSTIC_").lower().replace("_", "-")
        for v in pb.Diagnostic.DESCRIPTOR.values
        if v.number
    }


DIAGNOSTIC_NAMES = _diagnostic_names()
DIAGNOSTIC_VALUES = {name: value for value, name in DIAGNOSTIC_NAMES.items()}


def progress(d: dict[str, Any], queue_position: int = 0) -> pb.Progress:
    """A job's progress dict as a ``Progress`` message."""
    m = pb.Progress(
        stage=d.get("stage", ""),
        step=max(0, int(d.get("step") or 0)),
        steps=max(0, int(d.get("steps") or 0)),
        item=max(0, int(d.get("item") or 0)),
        items=max(0, int(d.get("items") or 0)),
        message=d.get("message", ""),
        queue_position=queue_position,
        elapsed_seconds=float(d.get("elapsed_seconds") or 0.0),
    )
    loss = d.get("loss")
    if loss is not None and math.isfinite(loss):
        m.loss = float(loss)
    return m


def recommendation(d: dict[str, Any] | None) -> pb.LayerRecommendation | None:
    """A ``LayerRecommendation.to_dict()`` as a message (None for anything else)."""
    if not isinstance(d, dict) or "layer" not in d:
        return None
    return pb.LayerRecommendation(
        editor=str(d.get("editor", "")),
        layer=int(d["layer"]),
        scores=[float(x) for x in d.get("scores", [])],
        candidates=[int(x) for x in d.get("candidates", [])],
        criterion=str(d.get("criterion", "")),
        cases=int(d.get("cases", 0) or 0),
        nothing_localised=not d.get("localised", True),
    )


def _numbers(d: dict[str, Any] | None) -> dict[str, float]:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[str(k)] = float(v)
    return out


def edit_record(rec: dict[str, Any], this_version: int) -> pb.EditRecord:
    """One edit's manifest record as an ``EditRecord`` (its version: the one that added it)."""
    req = rec.get("request") or {}
    m = pb.EditRecord(
        editor=str(rec.get("editor", "")),
        layer=int(rec.get("layer", -1) if rec.get("layer") is not None else -1),
        question=str(req.get("question", "")),
        constraint=str(req.get("constraint", "")),
        answer=str(req.get("answer", "")),
        version=int(rec.get("version") or this_version),
    )
    m.metrics.update(_numbers(rec.get("metrics")))
    for c in rec.get("checks") or ():
        m.checks.append(
            pb.EditCheck(
                kind=str(c.get("kind", "")),
                question=str(c.get("question", "")),
                answered=bool(c.get("answered")),
                p_answer=float(c.get("p_answer", 0.0)),
                got=str(c.get("got", "")),
            )
        )
    ev = recommendation(rec.get("layer_evidence"))
    if ev is not None:
        m.layer_evidence.CopyFrom(ev)
    return m


def version_summary(info) -> pb.Version:
    """A registry ``VersionInfo`` as a ``Version`` message without its edits and manifest (what ListVersions
    answers: it reads no manifest)."""
    return pb.Version(
        adapter=info.adapter,
        version=info.version,
        aliases=sorted(info.aliases),
        live="live" in info.aliases,
        parent=int(info.parent or 0),
        base_fingerprint=info.base_fingerprint,
        editors=[e for e in str(info.editor).split("+") if e],
        num_edits=info.num_edits,
        created_unix_ms=int(info.created * 1000),
        description=info.description,
        files=list(info.files),
    )


def version(info, figures_from: Path | None = None, audit: bool = True, manifest: dict | None = None) -> pb.Version:
    """A registry ``VersionInfo`` as a ``Version`` message (the manifest — ``manifest`` when given: a delta
    version's with its lineage's edits, ``Versions.manifest`` — included; without its ``audit``, who made the
    version from where, unless ``audit``)."""
    if manifest is None:
        try:
            manifest = info.manifest
        except Exception:
            manifest = {}
    if not audit:
        manifest = {k: v for k, v in manifest.items() if k != "audit"}
    m = version_summary(info)
    if manifest.get("editors"):  # the manifest's order (the tag's is the same, read without it)
        del m.editors[:]
        m.editors.extend(manifest["editors"])
    m.manifest_json = json.dumps(manifest, sort_keys=True)
    for rec in manifest.get("edits", []):
        if isinstance(rec, dict):
            m.edits.append(edit_record(rec, info.version))
    if figures_from is not None:
        for name in info.files:
            if name.lower().endswith(".png") and (figures_from / name).is_file():
                m.figures.append(pb.Figure(name=name, png=(figures_from / name).read_bytes()))
    return m


def matrix(mat) -> pb.Matrix:
    """A labelled matrix of numbers as a ``Matrix`` message (non-finite values as NaN)."""
    rows = [list(map(float, r)) for r in mat.values]
    cols = len(rows[0]) if rows else 0
    flat = [v if math.isfinite(v) else float("nan") for r in rows for v in r]
    return pb.Matrix(
        name=mat.name,
        rows=len(rows),
        cols=cols,
        values=flat,
        row_labels=[str(x) for x in mat.row_labels] if len(mat.row_labels) == len(rows) else [],
        col_labels=[str(x) for x in mat.col_labels] if len(mat.col_labels) == cols else [],
    )


def json_safe(x):
    """``x`` with non-finite floats as None and anything that is not JSON as its string."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def to_json(x) -> str:
    """``x`` as JSON (non-finite numbers as null)."""
    return json.dumps(json_safe(x))


def message_options(message) -> dict[str, Any]:
    """The fields of an options message that the request set, by name: an ``optional`` field when present,
    any other field when it differs from its default (proto3 cannot tell an unset one from its default)."""
    out: dict[str, Any] = {}
    for f in message.DESCRIPTOR.fields:
        if f.has_presence:
            if message.HasField(f.name):
                out[f.name] = getattr(message, f.name)
        elif getattr(message, f.name) != f.default_value:
            out[f.name] = getattr(message, f.name)
    return out


def editor_name(request: pb.EditRequest) -> str:
    """The editor an Edit request names: ``editor_name``, else the ``Editor`` enum (EDITOR_<NAME> is the
    editor <name>; unspecified is KeyGate, the default)."""
    if request.editor_name.strip():
        return request.editor_name.strip()
    value = request.editor or pb.EDITOR_KEYGATE
    return pb.Editor.Name(value).removeprefix("EDITOR_").lower()


def editor_options(request: pb.EditRequest, name: str) -> dict[str, Any]:
    """The options of editor ``name``: the request's options message of that name if the contract has one, and
    its ``editor_options`` (every editor: a key that is not a field of the editor's config is refused when the
    config is built, naming the allowed ones). A key given in both is refused."""
    from google.protobuf.json_format import MessageToDict

    free = MessageToDict(request.editor_options)
    fields = request.DESCRIPTOR.fields_by_name
    if name not in fields or fields[name].message_type is None or name == "editor_options":
        return free
    typed = message_options(getattr(request, name))
    twice = sorted(set(typed) & set(free))
    if twice:
        raise ValueError(f"option(s) {twice} given both in {name} and in editor_options: give each once")
    return {**typed, **free}


def diagnosis(report, name: str, served: pb.Served, figures: list[pb.Figure]) -> pb.DiagnoseResult:
    """A ``diagnostics.report.Report`` as the wire's ``DiagnoseResult``."""
    result = pb.DiagnoseResult(
        diagnostic=DIAGNOSTIC_VALUES[name],
        served=served,
        lines=report.lines,
        data_json=to_json(report.data),
        figures=figures,
        seconds=report.seconds,
    )
    for m in report.matrices:
        result.values.append(matrix(m))
    result.scalars.update({k: v for k, v in report.scalars.items() if v == v})
    if report.recommended_layer is not None:
        result.recommended_layer = int(report.recommended_layer)
    for r in report.recommendations:
        rec = recommendation(r)
        if rec is not None:
            result.recommendations.append(rec)
    return result


def adapter_summary(name: str, versions) -> pb.AdapterSummary:
    """An adapter with its live and latest version numbers."""
    live = next((v.version for v in versions if "live" in v.aliases), 0)
    return pb.AdapterSummary(
        name=name,
        live_version=live,
        latest_version=max((v.version for v in versions), default=0),
        num_versions=len(versions),
    )


#: ListVersions' page size when the request gives none, and the largest it may ask for
PAGE_SIZE, MAX_PAGE_SIZE = 50, 500


def version_list(adapter: str, infos, page_size: int = 0, page_token: str = "") -> pb.ListVersionsResponse:
    """One page of versions (ascending ``VersionInfo``s) newest first, as summaries, with every alias and the
    live version; ``next_page_token`` continues below the page's last version."""
    out = pb.ListVersionsResponse(adapter=adapter)
    for info in infos:
        for alias in info.aliases:
            out.aliases[alias] = info.version
    out.live_version = out.aliases.get("live", 0)
    size = min(page_size or PAGE_SIZE, MAX_PAGE_SIZE)
    newest = list(reversed(infos))
    if page_token:
        if not page_token.isdigit():
            raise ValueError(f"page_token {page_token[:40]!r} is not one this call returned")
        below = int(page_token)
        newest = [i for i in newest if i.version < below]
    for info in newest[:size]:
        out.versions.append(version_summary(info))
    if len(newest) > size:
        out.next_page_token = str(newest[size - 1].version)
    return out


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("editlens")
    except PackageNotFoundError:
        return "0+unknown"


def server_info(config, host, editors: list[str], running: int, queued: int) -> pb.ServerInfo:
    """What GetServerInfo answers: the configuration, the loaded model (once there is one) and the jobs."""
    lim = config.limits
    info = pb.ServerInfo(
        version=_package_version(),
        ready=host is not None,
        default_adapter=config.default_adapter,
        auth_required=bool(config.token),
        limits=pb.Limits(
            max_image_bytes=lim.max_image_bytes,
            max_image_pixels=lim.max_image_pixels,
            max_prompt_tokens=host.inputs.max_prompt_tokens if host is not None else lim.max_prompt_tokens or 0,
            max_new_tokens=lim.max_new_tokens,
            max_queued_jobs=lim.max_queued_jobs,
            max_message_bytes=lim.max_message_bytes,
            max_job_steps=lim.max_job_steps,
            max_job_seconds=lim.max_job_seconds or 0.0,
            max_text_chars=lim.max_text_chars,
            mutation_wait_s=config.mutation_wait_s,
        ),
        registry_uri=getattr(host.registry, "tracking_uri", "") if host is not None else "",
        editors=editors,
        jobs_running=running,
        jobs_queued=queued,
    )
    if host is not None:
        vlm = host.vlm
        info.model_path, info.base_fingerprint = str(vlm.path), vlm.fingerprint
        info.num_layers, info.device = vlm.num_layers, str(vlm.device)
        info.dtype = str(vlm.dtype).replace("torch.", "")
    return info


def job_info(job) -> pb.JobInfo:
    """A queued or running job as ListJobs and CancelJob answer it."""
    stage, step, steps = job.last
    return pb.JobInfo(
        id=job.id,
        kind=job.kind,
        adapter=job.adapter or "",
        state=job.state,
        cancelling=job.cancelled.is_set() and job.state in ("queued", "running"),
        stage=stage,
        step=step,
        steps=steps,
        seconds=time.monotonic() - job.accepted,
        peer=job.peer,
    )
