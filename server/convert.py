"""Between the server's Python objects and the wire messages of ``editlens.v1``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from editlens.v1 import editlens_pb2 as pb

DIAGNOSTIC_NAMES = {
    pb.DIAGNOSTIC_TRACE: "trace", pb.DIAGNOSTIC_NOISE_TRACE: "noise-trace", pb.DIAGNOSTIC_KNOCKOUT: "knockout",
    pb.DIAGNOSTIC_CONTRIBUTIONS: "contributions", pb.DIAGNOSTIC_MODULE_ATTRIBUTION: "module-attribution",
    pb.DIAGNOSTIC_VISUAL_ATTRIBUTION: "visual-attribution", pb.DIAGNOSTIC_RECOMMEND: "recommend",
}


def progress(d: dict[str, Any], queue_position: int = 0) -> pb.Progress:
    m = pb.Progress(stage=d.get("stage", ""), step=max(0, int(d.get("step") or 0)),
                    steps=max(0, int(d.get("steps") or 0)), item=max(0, int(d.get("item") or 0)),
                    items=max(0, int(d.get("items") or 0)), message=d.get("message", ""),
                    queue_position=queue_position, elapsed_seconds=float(d.get("elapsed_seconds") or 0.0))
    loss = d.get("loss")
    if loss is not None and math.isfinite(loss):
        m.loss = float(loss)
    return m


def recommendation(d: dict[str, Any] | None) -> pb.LayerRecommendation | None:
    if not isinstance(d, dict) or "layer" not in d:
        return None
    return pb.LayerRecommendation(editor=str(d.get("editor", "")), layer=int(d["layer"]),
                                  scores=[float(x) for x in d.get("scores", [])],
                                  candidates=[int(x) for x in d.get("candidates", [])],
                                  criterion=str(d.get("criterion", "")), cases=int(d.get("cases", 0) or 0))


def _numbers(d: dict[str, Any] | None) -> dict[str, float]:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[str(k)] = float(v)
    return out


def edit_record(rec: dict[str, Any], this_version: int) -> pb.EditRecord:
    req = rec.get("request") or {}
    m = pb.EditRecord(editor=str(rec.get("editor", "")), layer=int(rec.get("layer", -1) if rec.get("layer") is not None else -1),
                      question=str(req.get("question", "")), constraint=str(req.get("constraint", "")),
                      answer=str(req.get("answer", "")), version=int(rec.get("version") or this_version))
    m.metrics.update(_numbers(rec.get("metrics")))
    ev = recommendation(rec.get("layer_evidence"))
    if ev is not None:
        m.layer_evidence.CopyFrom(ev)
    return m


def version(info, figures_from: Path | None = None) -> pb.Version:
    """A registry ``VersionInfo`` as a ``Version`` message (the manifest included)."""
    try:
        manifest = info.manifest
    except Exception:  # noqa: BLE001 - a version whose manifest cannot be read still lists
        manifest = {}
    editors = manifest.get("editors") or [e for e in str(info.editor).split("+") if e]
    m = pb.Version(adapter=info.adapter, version=info.version, aliases=sorted(info.aliases),
                   live="live" in info.aliases, parent=int(info.parent or 0),
                   base_fingerprint=info.base_fingerprint, editors=list(editors), num_edits=info.num_edits,
                   created_unix_ms=int(info.created * 1000), description=info.description,
                   files=list(info.files), manifest_json=json.dumps(manifest, sort_keys=True))
    for rec in manifest.get("edits", []):
        if isinstance(rec, dict):
            m.edits.append(edit_record(rec, info.version))
    if figures_from is not None:
        for name in info.files:
            if name.lower().endswith(".png") and (figures_from / name).is_file():
                m.figures.append(pb.Figure(name=name, png=(figures_from / name).read_bytes()))
    return m


def matrix(mat) -> pb.Matrix:
    rows = [list(map(float, r)) for r in mat.values]
    cols = len(rows[0]) if rows else 0
    flat = [v if math.isfinite(v) else float("nan") for r in rows for v in r]
    return pb.Matrix(name=mat.name, rows=len(rows), cols=cols, values=flat,
                     row_labels=[str(x) for x in mat.row_labels] if len(mat.row_labels) == len(rows) else [],
                     col_labels=[str(x) for x in mat.col_labels] if len(mat.col_labels) == cols else [])


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def to_json(x) -> str:
    return json.dumps(_json_safe(x))
