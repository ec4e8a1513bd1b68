"""``editlens bench lifelong``: many edits on one model, one after another, as a lineage accumulates them.

The edits come from the world's edit stream (``vlm.world.stream``): distinct
facts — counterfactuals of known facts, insertions about the world's unseen
entities and about new entities drawn for the stream — in a fixed order per
world seed. Each editor edits them one at a time, each edit computed on the
model with every earlier edit attached and handed the previous edit set as
``onto`` (exactly what the server's Edit does on a lineage's live version).
After 10, 50, 100, 200, 500 and 1,000 edits (the marks up to ``--edits``)
every edit made so far is scored with all of them attached:

* the five E-VQA metrics (``editors.metrics``: reliability, text and modal
  generality, text and modal locality against the pre-edit model), the modal
  generality on a rendering never used in training, and efficacy (mean P(O*));
  beside modal locality, the same over the probes whose own fact no edit so far
  rewrote (``modal_locality_unedited``): a probe image of a known entity, asked
  a fact that a later edit of the stream rewrote, should answer the new value;
  and modal locality on a near neighbour (``modal_locality_near``, with
  ``modal_locality_near_cases``): the edit question on an image of another
  subject whose look differs from the edited subject's in exactly one attribute
  (``vlm.world.stream.NearNeighbours``), agreement with the pre-edit model's
  answer, over the edits whose subject has a neighbour and whose neighbour's
  asked fact no edit so far rewrote (``near_neighbours`` says how many of the
  run's edits have one, by attribute and by source);

* the specificity panel: exact-match accuracy on held-out questions about
  known entities that no edit so far touched, before (base model) and after;
* for an editor with a scope gate (VisEdit's, ``editors.visedit.scope``), the gate's
  decisions on every image of the benchmark, with the edits so far live: its
  recall (an image of an edited subject — the edit image, another rendering, a
  held-out one — opens an edit of that subject), its precision (of the edits it
  opens, those of the image's subject) and its false-accept rate on images of
  subjects no edit is about, split into the model's known images (the m_loc and
  specificity-panel images, which are among the gate's references) and images
  outside the references (held-out renderings of unedited known entities,
  renderings of stream entities no edit so far is about);
* with ``--serve N``, the final edit set registered as one version of a real
  server (gRPC on 127.0.0.1, MLflow on sqlite) and N Generate calls timed
  with it against the base model, inside the first edit's scope and outside
  every edit's;
* the mean latency of the edits since the previous mark (key, value and
  update included; facts differ in how many optimisation steps they need), and
  the latency of one fixed probe edit (the stream's next fact) made on the
  edits so far and dropped — equal work at every mark, compared with the same
  edit on the base model (``probe_edit_ms_no_edits``); the edit set's bytes
  per edit, and the update's norm
  (‖ΔW‖_F of the summed low-rank deltas, ‖W‖_F beside it; a gate's largest
  and mean value norm).

Beside the curves, every editor's single-edit figures on the first
``--single`` facts of the stream (each edit alone on the base model, its
specificity on the first 40 panel questions, as ``bench editing``), and the
key geometry the editors work with: the centred cosines of the stream's keys
(the same fact asked otherwise, another rendering, other subjects), which says
how separable the subjects are for the model at the edited layer.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from editors import get_editor
from editors import metrics as M
from editors.attach import attach
from editors.edit_set import EditSet
from editors.request import EditRequest
from vlm.loading import VLM
from vlm.scoring import score_answers
from vlm.world.stream import edit_stream, load_world, render_stream_images

from .editing import make_editor
from .harness import (
    StageFn,
    TickFn,
    in_thread,
    latencies,
    marks_up_to,
    median_ratio,
    near_summary,
    open_registry,
    sayer,
    scratch,
    service,
    since_mark,
    stream_with_probe,
    with_near_neighbours,
    world_header,
)

MARKS = (10, 50, 100, 200, 500, 1000)
METRICS = M.EVQA + ("modal_generality_heldout", "efficacy")
SINGLE_PANEL = 40


class GateProbes:
    """Every image the benchmark shows, with its subject, for scoring a scope gate (visual states read once)."""

    def __init__(self, vlm: VLM, world_dir: Path, records: list[dict], panel, pixels):
        from vlm.world.folder import WorldFolder

        spec = WorldFolder(world_dir).spec()
        n_train = int(spec["config"]["train_renderings"])
        owner = {img: e["id"] for e in spec["entities"] for img in e["images"]}
        items: dict[str, tuple[str, str]] = {}  # image path -> (entity, group)
        for r in records:
            for k in ("image", "image_rephrase", "image_heldout"):
                items.setdefault(r[k], (r["entity"], "stream"))
            items.setdefault(r["m_loc"], (owner[r["m_loc"]], "reference"))
        for e in spec["entities"]:
            if e["known"]:
                for img in e["images"][n_train:]:
                    items.setdefault(img, (e["id"], "outside"))
        self.pixels = [pixels(p) for p in items]
        self.entities = [ent for ent, _ in items.values()]
        self.groups = [group for _, group in items.values()]
        for ent, prompt in panel:  # the specificity panel's images: training renderings of known entities
            self.pixels.append(prompt.image)
            self.entities.append(ent)
            self.groups.append("reference")
        self._vlm, self._layer, self._visual = vlm, None, None

    def visual(self, layer: int) -> torch.Tensor:
        if layer != self._layer:
            from editors.visedit.calibration import visual_states

            self._visual, self._layer = visual_states(self._vlm, layer, self.pixels), layer
        return self._visual

    def report(self, edit_set: Any, edit_entities: list[str]) -> dict[str, Any]:
        """Recall, precision and false-accept rates of the image half of ``edit_set``'s gate on every probe
        image (whether the question asks what an opened edit asks is the metrics' part)."""
        selected = edit_set.image_gate()(self.visual(edit_set.config.layer).to(edit_set.vead.w1.weight.device)).cpu()
        edited = set(edit_entities)
        ents = torch.tensor([[a == b for b in edit_entities] for a in self.entities])  # (P, E) same subject
        opened_right = (selected & ents).any(1)
        in_scope = torch.tensor([e in edited for e in self.entities])
        out = {"probes": len(self.pixels)}
        out["recall"] = round(float(opened_right[in_scope].float().mean()), 4) if in_scope.any() else None
        pairs = int(selected.sum())
        out["precision"] = round(float((selected & ents).sum()) / pairs, 4) if pairs else None
        for group in ("reference", "outside", "stream"):
            rows = torch.tensor([g == group for g in self.groups]) & ~in_scope
            if rows.any():
                out[f"false_accept_{group}"] = round(float(selected[rows].any(1).float().mean()), 5)
                out[f"unrelated_{group}_images"] = int(rows.sum())
        return out


def served_latency(vlm: VLM, world_dir: Path, edit_set: Any, records: list[dict], requests: int) -> dict[str, Any]:
    """Generate through a real server (gRPC on 127.0.0.1, MLflow on sqlite in a temporary folder) with the
    final edit set registered as one version, against the base model: an image question inside the first
    edit's scope and one outside every edit's (the first case's unrelated image), ``requests`` each."""
    from server.bundles import publish

    first = records[0]
    with scratch("lifelong") as tmp:
        registry = open_registry(tmp)
        t0 = time.perf_counter()
        info = publish(registry, vlm, "lifelong", {edit_set.editor: edit_set}, edits=edit_set.records)
        t_publish = time.perf_counter() - t0
        with service(vlm, registry) as svc:
            lens = svc.lens
            inside = (Path(world_dir) / first["image"], first["src"])
            outside = (Path(world_dir) / first["m_loc"], first["m_loc_q"])
            served = lens.generate(*inside, adapter="lifelong")
            fns = {
                "base model, in scope": lambda: lens.generate(*inside, base=True),
                f"{edit_set.num_edits} live edits, in scope": lambda: lens.generate(*inside, adapter="lifelong"),
                "base model, out of scope": lambda: lens.generate(*outside, base=True),
                f"{edit_set.num_edits} live edits, out of scope": lambda: lens.generate(*outside, adapter="lifelong"),
            }
            out = in_thread(lambda: latencies(fns, requests))
    n = edit_set.num_edits
    for where in ("in scope", "out of scope"):
        out[f"ratio_median_{where.replace(' ', '_')}"] = median_ratio(
            out, f"{n} live edits, {where}", f"base model, {where}"
        )
    out.update(
        version=info.version,
        publish_ms=round(1000 * t_publish, 1),
        answer_in_scope=served.text,
        expected_in_scope=first["alt"],
        requests=requests,
    )
    return out


def marks_for(edits: int) -> list[int]:
    """The marks up to ``edits`` (and ``edits`` itself)."""
    return marks_up_to(MARKS, edits)


def _score_cases(vlm: VLM, cps: list[M.CasePrompts], loc_text, loc_modal, loc_near=None) -> dict[str, float]:
    """Means over cases of the E-VQA metrics, with whatever is attached now; and the modal locality over
    the probes whose fact no edit so far rewrote (a probe that asks an edited fact should change); and over
    the near neighbours' prompts (``loc_near``: the base model's answers, None where a case has none) whose fact
    no edit so far rewrote, scored in a call of their own."""
    kinds = ("reliability", "text_generality", "modal_generality", "text_locality", "modal_locality", "modal_heldout")
    prompts = [getattr(cp, k) for cp in cps for k in kinds]
    scores = score_answers(vlm, prompts, batch_size=64)
    rows = []
    for i in range(len(cps)):
        rel, tgen, mgen, tloc, mloc, held = scores[i * 6 : (i + 1) * 6]
        rows.append(
            {
                "type": cps[i].case["type"],
                "reliability": rel.token_accuracy,
                "text_generality": tgen.token_accuracy,
                "modal_generality": mgen.token_accuracy,
                "text_locality": M.agreement(loc_text[i], tloc),
                "modal_locality": M.agreement(loc_modal[i], mloc),
                "probe_fact": (cps[i].case.get("m_loc_entity"), cps[i].case.get("m_loc_relation")),
                "modal_generality_heldout": held.token_accuracy,
                "efficacy": rel.prob,
            }
        )
    out = {k: sum(r[k] for r in rows) / len(rows) for k in METRICS}
    edited = {(cp.case["entity"], cp.case["relation"]) for cp in cps}
    untouched = [r["modal_locality"] for r in rows if r["probe_fact"] not in edited]
    out["modal_locality_unedited"] = sum(untouched) / len(untouched) if untouched else float("nan")
    out["modal_locality_probes_unedited"] = len(untouched)
    near = [
        i
        for i, cp in enumerate(cps)
        if cp.modal_near is not None and loc_near and loc_near[i] is not None and not M.near_edited(cp, edited)
    ]
    after = score_answers(vlm, [cps[i].modal_near for i in near], batch_size=64) if near else []
    agree = [M.agreement(loc_near[i], a) for i, a in zip(near, after)]
    out["modal_locality_near"] = sum(agree) / len(agree) if agree else None
    out["modal_locality_near_cases"] = len(agree)
    out["evqa_mean"] = sum(out[k] for k in M.EVQA) / len(M.EVQA)
    out["by_type"] = {
        t: {k: round(sum(r[k] for r in rows if r["type"] == t) / n, 4) for k in M.EVQA} | {"cases": n}
        for t in sorted({r["type"] for r in rows})
        if (n := sum(r["type"] == t for r in rows))
    }
    return out


def update_norm(edit_set: Any, vlm: VLM) -> dict[str, float]:
    """How large the accumulated change is: ‖ΔW‖_F (and ‖W‖_F) for low-rank deltas, value norms for gates."""
    if isinstance(edit_set, EditSet):
        total, weight = 0.0, 0.0
        for d in edit_set.merged().deltas:
            U, V = d.U.double(), d.V.double()
            total += float(((U.T @ U) * (V.T @ V)).sum())
            weight += float(vlm.module(d.module).weight.double().pow(2).sum())
        return {"delta_fro": round(total**0.5, 4), "weight_fro": round(weight**0.5, 4)}
    if get_editor(edit_set.editor).gate == "key" and edit_set.gates:  # a key gate's memory (KeyGate's)
        norms = torch.cat([g.values.norm(dim=-1) for g in edit_set.gates])
        return {"value_norm_max": round(float(norms.max()), 4), "value_norm_mean": round(float(norms.mean()), 4)}
    dense: dict[str, torch.Tensor] = {}
    for d in getattr(edit_set, "deltas", None) or ():
        if getattr(d, "W", None) is not None:  # FT-L's dense ΔW
            dense[d.module] = dense.get(d.module, 0) + d.W.double()
    if dense:
        fro = sum(float(W.pow(2).sum()) for W in dense.values()) ** 0.5
        weight = sum(float(vlm.module(m).weight.double().pow(2).sum()) for m in dense) ** 0.5
        return {"delta_fro": round(fro, 4), "weight_fro": round(weight, 4)}
    return {}


def key_geometry(vlm: VLM, cps: list[M.CasePrompts], layer: int) -> dict[str, Any]:
    """Centred cosines of the stream's keys at ``layer`` (the ``down_proj`` input at the constraint)."""
    from editors.compute_key import constraint_keys
    from editors.preservation import preservation_statistics

    mean = preservation_statistics(vlm, layer).mean.float()

    def unit(prompts):
        K = torch.cat([constraint_keys(vlm, prompts[i : i + 64], layer) for i in range(0, len(prompts), 64)])
        K = K.cpu() - mean
        return K / K.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    src = unit([cp.reliability for cp in cps])
    reph = unit([cp.text_generality for cp in cps])
    other = unit([cp.modal_generality for cp in cps])
    ents = [cp.case["entity"] for cp in cps]
    same = torch.tensor([[a == b for b in ents] for a in ents])
    S = src @ src.T
    cross = other @ src.T
    own = (other * src).sum(-1)
    nearest_other = cross.masked_fill(same, -2).max(1).values

    def q(t, p):
        return round(float(t.quantile(p)), 3) if t.numel() else None

    return {
        "keys": len(cps),
        "layer": layer,
        "rephrase_own": {"mean": round(float((reph * src).sum(-1).mean()), 3), "p5": q((reph * src).sum(-1), 0.05)},
        "other_rendering_own": {"mean": round(float(own.mean()), 3), "p5": q(own, 0.05)},
        "other_subjects": {"mean": q(S[~same], 0.5), "p99": q(S[~same], 0.99), "max": q(S[~same], 1.0)},
        "other_rendering_nearest_is_own": round(float((own > nearest_other).float().mean()), 3),
    }


@dataclass
class _Stream:
    """The benchmark's facts, ready to edit and score, and what is scored once on the base model."""

    records: list[dict]  # the facts edited, in the stream's order
    foreign: list[dict]  # facts about new entities no edit of this run is about (unrelated images)
    pixels: M.PixelCache
    cps: list[M.CasePrompts]
    requests: list[EditRequest]
    probe: EditRequest  # the stream's next fact: the probe edit
    loc_text: list
    loc_modal: list
    panel: list
    panel_before: list[bool]
    loc_near: list | None = None  # the base model's answers on the near neighbours' prompts (None: no neighbour)
    near: dict | None = None  # how many edits have a near neighbour (``near_summary``)


def _prepare(vlm: VLM, world_dir: Path, edits: int, panel_size: int, say: StageFn) -> _Stream:
    """The edit stream's first ``edits`` facts and the probe fact, their images drawn, their prompts, and the
    base model's answers to the locality probes and to the specificity panel."""
    say(f"the edit stream: {edits} facts")
    records, probe_record = stream_with_probe(world_dir, edits, render=False)
    stream = records + [probe_record]
    later = edit_stream(load_world(world_dir))[edits + 1 :]  # facts no edit of this run is about: unrelated images
    foreign = [r for r in later if r["type"] == "new_entity" and r["entity"] not in {x["entity"] for x in stream}]
    foreign = list({r["entity"]: r for r in foreign}.values())[:200]
    drawn = render_stream_images(world_dir, stream + foreign)
    if drawn:
        say(f"drew {drawn} images of new entities")
    pixels = M.PixelCache(vlm, world_dir)
    with scratch("lifelong") as near_dir:  # neighbours' drawings the world has not made, processed while there
        cases = with_near_neighbours(world_dir, records, near_dir, pixels)  # copies: the records stay as they are
    cps = [M.case_prompts(vlm, c, pixels) for c in cases]
    requests = [EditRequest.from_case(c, world_dir, pixel_values=pixels(c["image"]), variants=False) for c in records]
    probe = EditRequest.from_case(probe_record, world_dir, pixel_values=pixels(probe_record["image"]), variants=False)
    loc_text = score_answers(vlm, [cp.text_locality for cp in cps], batch_size=64)
    loc_modal = score_answers(vlm, [cp.modal_locality for cp in cps], batch_size=64)
    panel = M.specificity_panel(vlm, world_dir, pixels, panel_size)
    panel_before = [s.exact for s in score_answers(vlm, [p for _, p in panel], batch_size=64)]
    loc_near = M.near_references(vlm, cps)
    return _Stream(
        records,
        foreign,
        pixels,
        cps,
        requests,
        probe,
        loc_text,
        loc_modal,
        panel,
        panel_before,
        loc_near,
        near_summary(cases),
    )


def _probe_ms(editor, probe: EditRequest, onto) -> float:
    """The same edit (the stream's next fact) timed on the current edits, then dropped: equal work."""
    t0 = time.perf_counter()
    editor.edit_sequentially([probe], onto=onto)
    return round(1000 * (time.perf_counter() - t0), 1)


def _single_figures(vlm: VLM, st: _Stream, editor, single: int) -> dict[str, Any]:
    """The first ``single`` facts edited each alone on the base model, scored on a smaller panel."""
    singles = editor.edit_each(st.requests[:single], batch_size=32)
    small = st.panel[:SINGLE_PANEL]  # each single edit is scored on its own: a smaller panel, as bench editing
    rows = M.evaluate_single_edits(vlm, st.cps[:single], M.baseline(vlm, st.cps[:single], small), singles)
    return M.summarise(rows)["all"]


def _mark_point(
    vlm: VLM, st: _Stream, editor, current, mark: int, times: list[float], previous: int, probes
) -> dict[str, Any]:
    """Every edit so far (``mark`` of them, ``current``) scored with all of them attached; ``previous`` is the
    last mark, ``probes`` the scope gate's probe images for a gated editor (else None)."""
    records, panel = st.records, st.panel
    with attach(vlm, current):
        scores = _score_cases(vlm, st.cps[:mark], st.loc_text, st.loc_modal, st.loc_near)
        edited = {r["entity"] for r in records[:mark]}
        keep = [j for j, (e, _) in enumerate(panel) if e not in edited]
        after = score_answers(vlm, [panel[j][1] for j in keep], batch_size=64)
    with tempfile.TemporaryDirectory() as d:
        size = current.save(Path(d) / "lifelong.safetensors")
    since = since_mark(times, mark, previous)
    gate = probes.report(current, [r["entity"] for r in records[:mark]]) if probes is not None else None
    point = {
        "edits": mark,
        **{k: None if v is None else round(v, 4) for k, v in scores.items() if k != "by_type"},
        "specificity_before": round(sum(st.panel_before[j] for j in keep) / max(1, len(keep)), 4),
        "specificity_after": round(sum(s.exact for s in after) / max(1, len(keep)), 4),
        "specificity_items": len(keep),
        "edit_ms": round(1000 * sum(since) / len(since), 1),
        "probe_edit_ms": _probe_ms(editor, st.probe, current),
        "bytes_per_edit": round(size / current.num_edits, 1),
        "norm": update_norm(current, vlm),
        "by_type": scores["by_type"],
    }
    if gate is not None:
        point["gate"] = gate
    return point


def _or_dash(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _say_point(say: StageFn, name: str, mark: int, point: dict[str, Any]) -> None:
    gate = point.get("gate")
    say(
        f"{name} after {mark}: rel {point['reliability']:.3f} tgen {point['text_generality']:.3f} "
        f"mgen {point['modal_generality']:.3f} tloc {point['text_locality']:.3f} "
        f"mloc {point['modal_locality']:.3f} (unedited facts {point['modal_locality_unedited']:.3f}) "
        f"mloc near {_or_dash(point['modal_locality_near'])} ({point['modal_locality_near_cases']} cases) "
        f"mgen held-out {point['modal_generality_heldout']:.3f} "
        f"spec {point['specificity_before']:.3f}->"
        f"{point['specificity_after']:.3f} ({point['edit_ms']} ms/edit)"
        + (f" gate recall {gate['recall']} precision {gate['precision']}" if gate else "")
    )


def _curve(vlm: VLM, st: _Stream, name: str, editor, marks: list[int], probes, say: StageFn, tick: TickFn | None):
    """The stream edited one fact after another, every edit so far scored at each mark; returns the curve, the
    latency of each edit and the final edit set."""
    edits = marks[-1]
    current, curve, times, done = None, [], [], 0
    for mark in marks:
        while done < mark:
            t0 = time.perf_counter()
            current = editor.edit_sequentially([st.requests[done]], onto=current)
            times.append(time.perf_counter() - t0)
            done += 1
            if tick:
                tick(done, edits)
        previous = curve[-1]["edits"] if curve else 0
        point = _mark_point(vlm, st, editor, current, mark, times, previous, probes)
        curve.append(point)
        _say_point(say, name, mark, point)
    return curve, times, current


def run(
    vlm: VLM,
    world_dir: str | Path,
    editors: list[str],
    edits: int = 1000,
    layer: int = 0,
    single: int = 100,
    panel_size: int = 200,
    overrides: dict[str, dict[str, Any]] | None = None,
    stage: StageFn | None = None,
    tick: TickFn | None = None,
    serve_requests: int = 0,
) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-ready dict (module docstring)."""
    say = sayer(stage)
    world_dir = Path(world_dir)
    if edits < 1 or single < 0 or panel_size < 1 or serve_requests < 0:
        raise ValueError("--edits and --panel must be at least 1, --single and --serve at least 0")
    if not 0 <= layer < vlm.num_layers:
        raise ValueError(f"layer {layer} is outside 0..{vlm.num_layers - 1}")
    for name in editors:
        get_editor(name)  # an unknown name fails here, before any work
    t_start = time.time()
    st = _prepare(vlm, world_dir, edits, panel_size, say)
    records = st.records
    result: dict[str, Any] = {
        **world_header(vlm, world_dir, layer),
        "edits": edits,
        "stream_types": {t: sum(r["type"] == t for r in records) for t in sorted({r["type"] for r in records})},
        "specificity_panel": len(st.panel),
        "near_neighbours": st.near,
        "editors": {},
    }
    say("key geometry of the stream")
    result["key_geometry"] = key_geometry(vlm, st.cps, layer)
    marks = marks_for(edits)
    probes = None
    for name in editors:
        editor = make_editor(name, vlm, layer, world_dir, (overrides or {}).get(name))
        entry: dict[str, Any] = {"hyperparameters": editor.hyperparameters("sequential")}
        # an editor whose edits a scope gate limits (EditorSpec.gate), once its gate is calibrated
        gated = get_editor(name).gate == "scope" and editor.adapter.scope is not None
        if gated and probes is None:
            say("the scope gate's probe images")
            probes = GateProbes(vlm, world_dir, records + st.foreign, st.panel, st.pixels)
        if single:
            say(f"{name}: {min(single, edits)} single edits")
            entry["single"] = _single_figures(vlm, st, editor, single)
        say(f"{name}: {edits} edits, one after another")
        entry["probe_edit_ms_no_edits"] = _probe_ms(editor, st.probe, None)
        curve, times, current = _curve(vlm, st, name, editor, marks, probes if gated else None, say, tick)
        entry["curve"] = curve
        entry["final"] = {k: v for k, v in curve[-1].items() if k != "by_type"}
        entry["first_edit_ms"] = round(1000 * times[0], 1)
        if serve_requests:
            say(f"{name}: Generate through the service with the {edits} edits as one version")
            entry["served"] = served_latency(vlm, world_dir, current, records, serve_requests)
        result["editors"][name] = entry
    result["seconds"] = round(time.time() - t_start, 1)
    return result


def figure(result: dict[str, Any], path: str | Path) -> Path:
    """A PNG of the curves: one panel per metric, one line per editor, edits on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(M.EVQA) + ["specificity_after"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 7), sharex=True)
    for ax, key in zip(axes.flat, keys):
        for name, entry in result["editors"].items():
            xs = [p["edits"] for p in entry["curve"]]
            ax.plot(xs, [p[key] for p in entry["curve"]], marker="o", label=name)
        ax.set_title(key.replace("_", " "))
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    for ax in axes[1]:
        ax.set_xlabel("accumulated edits")
    fig.suptitle(f"Lifelong editing on {Path(result['world']).name}: every edit so far, scored after N edits")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
