"""Diagnose as a job: the request's case and options checked, ``diagnostics.report.run_diagnostic`` run
on the chosen version, its report turned into a ``DiagnoseResult``."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editlens.v1 import editlens_pb2 as pb

from diagnostics.cases import DiagnosticCase
from editors import layer_rule

from . import convert
from .bundles import Bundle, attached
from .errors import invalid
from .host import Host


@dataclass
class DiagnosePlan:
    """A checked Diagnose request: the diagnostic, its cases and options, the version diagnosed."""

    name: str
    cases: list[DiagnosticCase]
    options: dict[str, Any]
    bundle: Bundle | None
    served: pb.Served
    png: bool


def _options(name: str, o: pb.DiagnoseOptions, num_layers: int) -> dict[str, Any]:
    """The options the request set, as ``run_diagnostic`` names them."""
    opts = convert.message_options(o)
    for key in ("kinds", "relations", "layers"):
        if key in opts:
            opts[key] = list(opts[key])
    if name == "recommend" and opts.get("editor"):  # an editor's name -> the rule that picks its layer
        opts["editor"] = layer_rule(opts["editor"])
    if "layers" in opts and name == "contributions":
        opts["early_layers"] = opts.pop("layers")
    if "window" in opts and not 1 <= opts["window"] <= num_layers:
        raise invalid(f"window {opts['window']} is outside 1..{num_layers}")
    if opts.get("samples") is not None and not 1 <= opts["samples"] <= 64:
        raise invalid("samples must be in 1..64")
    return opts


def plan_diagnose(host: Host, request: pb.DiagnoseRequest) -> DiagnosePlan:
    """Check a Diagnose request and resolve the version it diagnoses."""
    from diagnostics.recommend import request_cases

    name = convert.DIAGNOSTIC_NAMES.get(request.diagnostic)
    if name is None:
        raise invalid("name the diagnostic: " + ", ".join(convert.DIAGNOSTIC_NAMES.values()))
    inputs = host.inputs
    image = inputs.image(request.image, "image", required=True)
    question = inputs.text(request.question, "question")
    constraint = inputs.text(request.constraint, "constraint")
    answer = request.answer.strip() or None
    inputs.encode(question, image=image, constraints=[constraint])
    rephrase = request.rephrase.strip() or None
    image2 = inputs.image(request.image_rephrase, "image_rephrase", required=False)
    if rephrase:
        inputs.encode(rephrase, image=image, constraints=[constraint])
    options = _options(name, request.options, host.vlm.num_layers)
    served, bundle = host.versions.resolve(request.adapter if request.HasField("adapter") else None)
    if name == "recommend" and (rephrase or image2 is not None):
        cases = request_cases(
            question, constraint, image, rephrase=rephrase, image_rephrase=image2, replacements=host.phrases
        )
        for c in cases:
            c.answer = answer
    else:
        cases = [
            DiagnosticCase(
                question, constraint, image=image, answer=answer, label="request", replacements=list(host.phrases)
            )
        ]
    return DiagnosePlan(name, cases, options, bundle, served, request.png)


def run_diagnose(host: Host, job, plan: DiagnosePlan) -> pb.DiagnoseResult:
    """The diagnose job: the diagnostic on the plan's version, as the wire's result."""
    from diagnostics.report import run_diagnostic

    def case_progress(done: int, total: int) -> None:
        job.emit("cases", done, total, item=max(0, done - 1), items=total)

    def cell_progress(done: int, total: int) -> None:
        job.emit("cells", done, total)

    job.emit(plan.name, message=f"running {plan.name}")
    with tempfile.TemporaryDirectory(prefix="editlens-diagnose-") as tmp, attached(host.vlm, plan.bundle):
        out = Path(tmp) / "figure.png" if plan.png else None
        report = run_diagnostic(host.vlm, plan.name, plan.cases, plan.options, out, case_progress, cell_progress)
        figures = [
            pb.Figure(name=p.name.replace("figure", plan.name, 1), png=Path(p).read_bytes()) for p in report.figures
        ]
    return convert.diagnosis(report, plan.name, plan.served, figures)
