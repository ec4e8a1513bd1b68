"""Edit and TrainVisEdit as jobs: what the servicer's two mutating streams run.

An edit is planned in the RPC's thread (``plan_edit``: inputs checked, the
editor looked up in the registry of editors and built from the request's
options, so a bad request is refused at once with its status) and run as a
job (``run_edit``):

1. the adapter's live version, read fresh, is what the edit builds on;
2. the editor computes the new edits on the model as that version serves it:
   its own edit set of the same editor is ``onto`` (sequential editing), the
   other editors' edit sets are attached (unless the editor reads its edits
   off the base model, as VisEdit does);
3. the new version is asked the request's own prompts, every edit set
   attached (``edit_checks``): its question on its image, its rephrase, its
   question on its other image. An edit that misses its own answer is refused
   (FAILED_PRECONDITION with the figures, nothing registered) unless the
   request says ``keep_unreached`` (registered, ``live`` not moved); with
   ``strict`` a missed variant is refused too;
4. ``bundles.publish`` registers the new version (the live version's other
   edit sets carried over, every edit's manifest record with its checks, the
   layer-evidence figure) and moves ``live`` unless told not to. A cancel
   before that point leaves no trace.

Training (``run_training``) trains a VisEdit editor on a world's training
split and publishes the trained adapter (an edit set without edits) with its
training summary and figures.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editlens.v1 import editlens_pb2 as pb

from editors import EditContext, EditorSpec, get_editor, trained_editor
from editors.base import EditorBase, EditSetBase
from editors.request import EditProgress, EditRequest
from vlm.options import ConfigError, build_config
from vlm.scoring import generate, score_answers
from vlm.world.folder import WorldFolder

from . import convert
from .bundles import Bundle, attached, publish
from .errors import invalid, precondition
from .host import Host

log = logging.getLogger("editlens.server")


@dataclass
class EditPlan:
    """A checked Edit request: the adapter, the editor built from its options, the request, what to register."""

    adapter: str
    spec: EditorSpec
    editor: EditorBase
    request: EditRequest
    promote: bool
    description: str
    caller: dict[str, Any] = field(default_factory=dict)  # who asked (time, peer, ...): the version's audit
    keep_unreached: bool = False  # register an edit that misses its own answer, without moving live
    strict: bool = False  # refuse an edit that misses one of its variants too


#: the settings that set how much work a job does (a steps count of an editor's or the trainer's config)
WORK_OPTIONS = ("steps",)


def check_work(config: Any, limit: int) -> None:
    """INVALID_ARGUMENT for a work setting above the server's ``--max-job-steps``: a job must end."""
    for name in WORK_OPTIONS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > limit:
            raise invalid(f"{name}={value} is over this server's limit of {limit} (--max-job-steps)")


def plan_edit(host: Host, request: pb.EditRequest) -> EditPlan:
    """Check an Edit request and build its editor (INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION)."""
    inputs = host.inputs
    adapter = host.versions.adapter_name(request.adapter)
    image = inputs.image(request.image, "image", required=True)
    image2 = inputs.image(request.image_rephrase, "image_rephrase", required=False)
    question = inputs.text(request.question, "question")
    constraint = inputs.text(request.constraint, "constraint")
    answer = inputs.text(request.answer, "answer")
    rephrase = inputs.text(request.rephrase, "rephrase", required=False) or None
    description = inputs.text(request.description, "description", required=False)
    for q in (question, rephrase) if rephrase else (question,):
        inputs.encode(q, image=image, answer=answer, constraints=[constraint])
    spec = get_editor(convert.editor_name(request))
    config = spec.config(host.vlm, **convert.editor_options(request, spec.name))
    check_work(config, host.inputs.limits.max_job_steps)
    context = EditContext(lookup=host.versions.lookup, replacements=host.phrases)
    editor = spec.create(host.vlm, config, context)
    req = EditRequest(
        question,
        constraint,
        answer,
        image=image,
        rephrase=rephrase,
        image_rephrase=image2,
        replacements=host.phrases,
    )
    return EditPlan(
        adapter,
        spec,
        editor,
        req,
        not request.no_promote,
        description,
        keep_unreached=request.keep_unreached,
        strict=request.strict,
    )


def run_edit(host: Host, job, plan: EditPlan):
    """The edit job: compute, score, publish; returns the new version's ``VersionInfo``."""
    vlm, name = host.vlm, plan.spec.name
    live = host.versions.live_info(plan.adapter)
    base = host.versions.bundle(plan.adapter, live.version, live) if live is not None else None
    onto = base.edit_sets.get(name) if base is not None else None

    def progress(e: EditProgress) -> None:
        job.emit(e.stage, e.step, e.steps, e.edit, e.edits, e.loss)

    served_others = base.without(name) if base is not None and not plan.editor.reads_base_model else None
    with attached(vlm, served_others):
        new = plan.editor.edit_sequentially([plan.request], onto=onto, progress=progress)
    job.check_cancelled()
    job.emit("score")
    edit_sets = {**(base.edit_sets if base is not None else {}), name: new}
    records = plan.editor.manifest_records(new, onto.num_edits if onto is not None else 0)
    checks = edit_checks(host, plan.request, Bundle(plan.adapter, 0, {}, edit_sets))
    promote = plan.promote and _judge(plan, checks, records[-1].get("metrics", {}) if records else {})
    edits = [  # this version's own edits; the parent's are its manifest's (a delta version, ``bundles``)
        {
            **rec,
            "metrics": {**rec.get("metrics", {}), **_check_metrics(checks)},
            "checks": checks,
            "version": None,
            "description": plan.description,
        }
        for rec in records
    ]
    with tempfile.TemporaryDirectory(prefix="editlens-edit-") as tmp:
        info = publish(
            host.registry,
            vlm,
            plan.adapter,
            edit_sets,
            edits=edits,
            parent=live.version if live is not None else None,
            description=plan.description,
            figures=evidence_figures(plan.editor.layer_evidence, Path(tmp)),
            extra={"audit": {"action": "edit", **plan.caller}},
            promote=promote,
            parent_must_be_live=True,  # a replica that made a version live meanwhile: ABORTED, not a lost edit
            delta_of=base,
            before_register=_registering(job, f"registering a new version of adapter '{plan.adapter}'"),
        )
    _after_publish(host, plan.adapter, info, {"action": "edit", **plan.caller})
    return info


def _registering(job, message: str) -> Callable[[], None]:
    def before() -> None:
        job.check_cancelled()  # the last point at which a cancel leaves no trace
        job.emit("register", message=message)

    return before


def _after_publish(host: Host, adapter: str, info, audit: dict[str, Any] | None = None) -> None:
    host.versions.forget(adapter)
    if audit is not None:
        host.registry.audit(adapter, {**audit, "version": info.version, "live": "live" in info.aliases})
    try:  # load the new version now (from its registered files), so its first request is fast
        host.versions.bundle(adapter, info.version, info)
    except Exception as exc:  # a request for it will report the problem with its status
        log.warning("the new version %s of %s does not load: %s", info.version, adapter, exc)


def edit_checks(host: Host, req: EditRequest, bundle: Bundle) -> list[dict[str, Any]]:
    """The request's own prompts asked of the new version (every edit set of ``bundle`` attached): its question on
    its image ("edit"), its rephrase on its image, its question on its other image; each with P(answer)
    (teacher-forced), whether greedy decoding gives the answer, and what it gives."""
    prompts = [("edit", req.question, req.image), ("rephrase", req.rephrase, req.image)]
    prompts.append(("image_rephrase", req.question, req.image_rephrase))
    prompts = [(kind, q, image) for kind, q, image in prompts if q is not None and image is not None]
    with bundle.attached(host.vlm):
        scored = [host.inputs.encode(q, image=image, answer=req.answer) for _, q, image in prompts]
        scores = score_answers(host.vlm, scored)
        n_new = max(len(p.answer_positions) for p in scored) + 2
        got = generate(host.vlm, [host.inputs.encode(q, image=image) for _, q, image in prompts], n_new)
    return [
        {"kind": kind, "question": q, "answered": s.exact, "p_answer": s.prob, "got": g}
        for (kind, q, _), s, g in zip(prompts, scores, got)
    ]


def _check_metrics(checks: list[dict[str, Any]]) -> dict[str, float]:
    """The variants' checks as the manifest's metrics have always named them (p_rephrase, rephrase_exact, ...)."""
    out: dict[str, float] = {}
    for c in checks:
        if c["kind"] != "edit":
            out[f"p_{c['kind']}"] = c["p_answer"]
            out[f"{c['kind']}_exact"] = float(c["answered"])
    return out


def _judge(plan: EditPlan, checks: list[dict[str, Any]], metrics: dict[str, Any]) -> bool:
    """Whether the new version may go live: FAILED_PRECONDITION (nothing registered) for an edit that misses its
    own answer (unless ``keep_unreached``: registered, not live) or, with ``strict``, one of its variants."""
    answer = plan.request.answer
    own = next(c for c in checks if c["kind"] == "edit")
    if not own["answered"]:
        figures = f"P({answer!r}) {metrics.get('p_before', float('nan')):.3g} -> {own['p_answer']:.3g}"
        if not plan.keep_unreached:
            raise precondition(
                f"the edit does not reach its own answer: asked {own['question']!r} on the edit image, the new "
                f"version answers {own['got']!r}, not {answer!r} ({figures}); nothing was registered. Try another "
                "layer or more steps, or keep_unreached (CLI --keep-unreached) to register it without making it live"
            )
        return False
    missed = [c for c in checks if c["kind"] != "edit" and not c["answered"]]
    if missed and plan.strict:
        what = "; ".join(f"{c['kind']} {c['question']!r} answers {c['got']!r} (P {c['p_answer']:.3g})" for c in missed)
        raise precondition(
            f"strict: the edit answers {answer!r} on its own prompt but not on {what}; nothing was registered"
        )
    return True


def evidence_figures(evidence: dict | None, folder: Path) -> dict[str, Path]:
    """``layer-evidence.png`` of a layer choice, when there is one (a figure never fails a job)."""
    from diagnostics.recommend import render_evidence

    if not evidence:
        return {}
    try:
        return {"layer-evidence.png": render_evidence(evidence, folder / "layer-evidence.png")}
    except Exception as exc:  # matplotlib can fail on odd data; the version is still worth registering
        log.warning("could not render the layer evidence: %s", exc)
        return {}


# ------------------------------------------------------------------ training
@dataclass
class TrainPlan:
    """A checked TrainVisEdit request."""

    adapter: str
    world: Path
    config: Any
    promote: bool
    caller: dict[str, Any] = field(default_factory=dict)


def plan_training(host: Host, request: pb.TrainVisEditRequest) -> TrainPlan:
    """Check a TrainVisEdit request: the world folder and the trainer's settings (INVALID_ARGUMENT)."""
    spec = trained_editor()
    adapter = host.versions.adapter_name(request.adapter or spec.name)
    world = WorldFolder(request.cases_path) if request.cases_path else host.world
    if world is None:
        raise invalid(
            f"the served model {host.vlm.path} is not a world's model: VisEdit trains on a world's training "
            "split; give cases_path = a world folder (one `editlens world build` wrote)"
        )
    if not world.world_json.is_file() or not world.edit_cases_file("train").is_file():
        raise invalid(
            f"{world} is not a world folder (world.json and edit_cases/train.json): VisEdit trains on "
            "a world's training split; give cases_path = such a folder"
        )
    options = convert.message_options(request.train)
    options["layer"] = request.layer if request.HasField("layer") else "auto"
    if request.steps:
        options["steps"] = int(request.steps)
    config = build_config(spec.trainer.config_class, options)
    config.check()
    check_work(config, host.inputs.limits.max_job_steps)
    if config.layer != "auto" and not 0 <= config.layer < host.vlm.num_layers:
        raise ConfigError(f"layer {config.layer} is outside 0..{host.vlm.num_layers - 1}")
    return TrainPlan(adapter, world.root, config, not request.no_promote)


def run_training(host: Host, job, plan: TrainPlan):
    """The training job: train, then publish the trained editor as a version; returns its ``VersionInfo``."""
    spec = trained_editor()

    def progress(p) -> None:
        job.emit(p.stage, p.step, p.steps, loss=p.losses.get("loss", p.validation_loss), message=p.message)

    with tempfile.TemporaryDirectory(prefix="editlens-train-") as tmp:
        summary = spec.trainer.train(host.vlm, plan.world, Path(tmp), plan.config, progress)
        job.check_cancelled()
        trained: EditSetBase = spec.load(summary["adapter_path"], host.vlm)
        figures = evidence_figures(summary.get("layer_evidence"), Path(tmp))
        if summary.get("figure"):
            figures["training.png"] = Path(summary["figure"])
        training = {k: v for k, v in summary.items() if k not in ("adapter_path", "figure")}
        info = publish(
            host.registry,
            host.vlm,
            plan.adapter,
            {spec.name: trained},
            edits=[],
            description=f"a trained {spec.name} editor",
            figures=figures,
            extra={"training": {"editor": spec.name, **training}, "audit": {"action": "train", **plan.caller}},
            promote=plan.promote,
            before_register=_registering(job, f"registering the trained editor as a version of '{plan.adapter}'"),
        )
    _after_publish(host, plan.adapter, info, {"action": "train", **plan.caller})
    return info
