"""The EditLens gRPC servicer: generation, edits, versions and diagnostics on one loaded model.

How a request is served:

* the model is loaded once (``ModelHost`` in ``server.app`` hands it over);
  every version of every adapter is applied to it per request, in the
  request's own thread (``Bundle.attached``: thread-scoped forward hooks),
  so generation of different versions, an edit job and a diagnostic run at
  the same time on the same weights, which are never copied or reloaded;
* a request resolves its version once (``_resolve``: the adapter's live alias
  through a cache at most ``live_ttl`` old, or the version/alias it names)
  and uses that version for the whole request, so an answer never mixes two
  versions;
* edits and diagnostics are jobs (``server.jobs``) that stream progress;
  generation is served while they run;
* every error becomes a status code with a readable message
  (``server.errors``).
"""

from __future__ import annotations

import hmac
import io
import logging
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from editlens.v1 import editlens_pb2 as pb
from editlens.v1 import editlens_pb2_grpc as pb_grpc

from . import convert
from .bundles import Bundle, BundleCache, BundleError, EDIT_SET_FILES, attached, load_bundle
from .config import ServerConfig
from .errors import JobCancelled, ServiceError, exhausted, invalid, not_found, precondition, rpc, unavailable
from .jobs import JobRunner, follow

log = logging.getLogger("editlens.server")
MUTATING = ("Edit", "TrainVisEdit", "SetAlias", "Rollback", "DeleteVersion")
_MISSING = object()   # the adapter does not exist (cached like a version number)


def boolean(value: str) -> bool:
    """A training option's text as a bool: true/false, yes/no, 1/0."""
    v = value.strip().lower()
    if v in ("true", "yes", "1"):
        return True
    if v in ("false", "no", "0"):
        return False
    raise ValueError(value)


def _job_stream(job, ahead: int, context, event, what: str):
    """The events of a submitted job as ``event`` messages: queued, its progress, then its result."""
    yield event(progress=pb.Progress(
        stage="queued", queue_position=ahead,
        message=f"{what} job {job.id} accepted" + (f"; {ahead} job(s) ahead" if ahead else "")))
    events = follow(job, context)
    while True:
        try:
            ev = next(events)
        except StopIteration as done:
            yield event(result=done.value)
            return
        yield event(progress=convert.progress(ev))


def _version_string() -> str:
    try:
        from importlib.metadata import version

        return version("editlens")
    except Exception:  # noqa: BLE001
        return "0+unknown"


class EditLensService(pb_grpc.EditLensServicer):
    def __init__(self, config: ServerConfig):
        self.config = config
        self.limits = config.limits
        self.vlm = None
        self.registry = None
        self.state = "starting"          # starting | loading | ready | failed
        self.state_detail = ""
        self.phrases: list[str] = []
        self.bundles = BundleCache(config.bundle_cache)
        self.jobs = JobRunner(config.job_workers, config.limits.max_queued_jobs)
        self._live: dict[str, tuple[Any, float]] = {}
        self._live_lock = threading.Lock()
        self.max_prompt_tokens = config.limits.max_prompt_tokens

    # ------------------------------------------------------------ lifecycle
    def set_ready(self, vlm, registry) -> None:
        from diagnostics.cases import world_phrases

        self.registry = registry
        self.phrases = world_phrases(Path(vlm.path).parent)
        if self.max_prompt_tokens is None:
            ctx = getattr(vlm.text_config, "max_position_embeddings", None) or 4096
            self.max_prompt_tokens = max(1, int(ctx) - self.limits.max_new_tokens)
        self.vlm = vlm
        self.state, self.state_detail = "ready", ""

    def set_failed(self, detail: str) -> None:
        self.state, self.state_detail = "failed", detail

    def close(self) -> None:
        self.jobs.close()

    def _ready(self):
        if self.vlm is None or self.registry is None:
            if self.state == "failed":
                raise unavailable(f"the server could not load its model: {self.state_detail}")
            raise unavailable("the model is not loaded yet (" + (self.state_detail or self.state)
                              + "); the health service reports SERVING once it is")
        return self.vlm

    # ---------------------------------------------------------------- auth
    def _auth(self, context) -> None:
        token = self.config.token
        if not token:
            return
        given = None
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization":
                given = value
                break
        if not given:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                               "this call changes the registry and needs a token: send the metadata "
                               "'authorization: Bearer <token>' (SDK: token=..., CLI: --token or EDITLENS_TOKEN)")
        scheme, _, value = given.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                               "the authorization metadata must read 'Bearer <token>'")
        if not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, "the token is not valid for this server")

    # -------------------------------------------------------------- inputs
    def _image(self, data: bytes, what: str = "image", required: bool = True):
        """Decode image bytes within the limits; None when absent and optional."""
        from PIL import Image

        from vlm.images import load_image

        if not data:
            if required:
                raise invalid(f"the {what} is missing (send the image file's bytes)")
            return None
        if len(data) > self.limits.max_image_bytes:
            raise exhausted(f"the {what} is {len(data)} bytes; the limit is {self.limits.max_image_bytes}")
        try:
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
        except Exception:  # noqa: BLE001 - undecodable: load_image below says why
            w = h = 0
        if w * h > self.limits.max_image_pixels:
            raise exhausted(f"the {what} is {w}x{h} = {w * h} pixels; the limit is {self.limits.max_image_pixels}")
        return load_image(bytes(data))   # ImageDecodeError -> INVALID_ARGUMENT

    @staticmethod
    def _text(value: str, what: str) -> str:
        if not value or not value.strip():
            raise invalid(f"the {what} is empty")
        return value.strip()

    def _adapter_name(self, name: str) -> str:
        from registry import check_adapter_name

        return check_adapter_name(name or self.config.default_adapter)

    def _encode(self, question: str, image=None, answer: str | None = None, constraints=None):
        from vlm.prompts import encode

        return encode(self.vlm.processor, question, image=image, answer=answer, constraints=constraints,
                      max_tokens=self.max_prompt_tokens)

    # ------------------------------------------------------------ versions
    def _live_version(self, adapter: str):
        """The adapter's live version number (None: none; _MISSING: no such adapter), at most live_ttl old."""
        from registry import NotFoundError

        now = time.monotonic()
        with self._live_lock:
            hit = self._live.get(adapter)
        if hit is not None and now - hit[1] < self.config.live_ttl:
            return hit[0]
        try:
            value = self.registry.live_version_number(adapter, max_age=0)
        except NotFoundError:
            value = _MISSING
        with self._live_lock:
            self._live[adapter] = (value, now)
        return value

    def _forget_live(self, adapter: str) -> None:
        with self._live_lock:
            self._live.pop(adapter, None)

    def _bundle(self, adapter: str, version: int, info=None) -> Bundle:
        return self.bundles.get(adapter, version, lambda: self._load_bundle(adapter, version, info))

    def _load_bundle(self, adapter: str, version: int, info=None) -> Bundle:
        from registry import NotFoundError, RegistryError

        info = info or self.registry.version(adapter, version)
        if info.base_fingerprint and info.base_fingerprint != self.vlm.fingerprint:
            from editors.edit_set import FingerprintMismatchError

            raise FingerprintMismatchError(
                f"adapter '{adapter}' version {version} was made for the base model with fingerprint "
                f"{info.base_fingerprint}, but this server runs {self.vlm.fingerprint}; it cannot be applied")
        try:
            folder = self.registry.download(adapter, version)
            manifest = info.manifest
        except NotFoundError:
            raise
        except RegistryError as exc:
            if "cannot reach" in str(exc):
                raise
            raise BundleError(f"adapter '{adapter}' version {version} cannot be loaded: {exc}") from None
        except (OSError, ValueError) as exc:
            raise BundleError(f"adapter '{adapter}' version {version} cannot be loaded: {exc}") from None
        return load_bundle(self.vlm, adapter, version, folder, manifest, info.base_fingerprint)

    def _resolve(self, ref: pb.AdapterRef | None) -> tuple[pb.Served, Bundle | None]:
        """The version a request uses (resolved once) and its bundle (None: the base model)."""
        explicit = bool(ref is not None and ref.adapter)
        adapter = self._adapter_name(ref.adapter if ref is not None else "")
        which = ref.WhichOneof("ref") if ref is not None else None
        if which == "base":
            return pb.Served(), None
        if which == "version":
            if ref.version < 1:
                raise invalid("a version number is >= 1")
            bundle = self.bundles.peek(adapter, ref.version) or self._bundle(adapter, ref.version)
            return pb.Served(adapter=adapter, version=ref.version), bundle
        if which == "alias" and ref.alias != "live":
            info = self.registry.version(adapter, ref.alias)
            return pb.Served(adapter=adapter, version=info.version, alias=ref.alias), \
                self._bundle(adapter, info.version, info)
        live = self._live_version(adapter)
        if live is _MISSING:
            if explicit:
                raise not_found(f"adapter '{adapter}' not found")
            return pb.Served(), None          # the default adapter has no version yet: the base model answers
        if live is None:
            if which == "alias":
                raise not_found(f"adapter '{adapter}' has no alias 'live'")
            return pb.Served(), None
        return pb.Served(adapter=adapter, version=live, alias="live"), self._bundle(adapter, live)

    # ------------------------------------------------------------ generate
    def _generation_inputs(self, request: pb.GenerateRequest):
        vlm = self._ready()
        question = self._text(request.prompt, "prompt")
        n = request.max_new_tokens or self.limits.default_new_tokens
        if n > self.limits.max_new_tokens:
            raise invalid(f"max_new_tokens {n} is over the limit of {self.limits.max_new_tokens}")
        image = self._image(request.image, required=False)
        prompt = self._encode(question, image=image)
        return vlm, prompt, n

    def _gen_kwargs(self, vlm, prompt, n: int) -> dict:
        import torch

        tok = vlm.tokenizer
        kwargs = {"input_ids": prompt.input_ids[None].to(vlm.input_device),
                  "attention_mask": torch.ones(1, prompt.length, dtype=torch.long, device=vlm.input_device),
                  "max_new_tokens": n, "do_sample": False, "eos_token_id": tok.eos_token_id,
                  "pad_token_id": tok.pad_token_id}
        if prompt.pixel_values is not None:
            kwargs["pixel_values"] = prompt.pixel_values[None].to(vlm.input_device, vlm.dtype)
        return kwargs

    @rpc
    def Generate(self, request, context):
        t0 = time.perf_counter()
        vlm, prompt, n = self._generation_inputs(request)
        served, bundle = self._resolve(request.adapter)
        import torch

        with torch.no_grad(), attached(vlm, bundle):
            out = vlm.model.generate(**self._gen_kwargs(vlm, prompt, n))
        ids = out[0, prompt.length:].tolist()
        text = vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        special = set(vlm.tokenizer.all_special_ids)
        return pb.GenerateResponse(text=text, served=served, prompt_tokens=prompt.length,
                                   answer_tokens=sum(1 for i in ids if i not in special),
                                   seconds=time.perf_counter() - t0)

    @rpc
    def GenerateStream(self, request, context):
        vlm, prompt, n = self._generation_inputs(request)
        served, bundle = self._resolve(request.adapter)
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        tok = vlm.tokenizer
        special = set(tok.all_special_ids)

        class Streamer:   # transformers' streamer protocol: put(ids) per step (the prompt first), end()
            def __init__(self):
                self.prompt_seen, self.ids, self.sent = False, [], ""

            def put(self, value):
                if stop.is_set():
                    raise JobCancelled("the client went away")
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                self.ids += [i for i in value.reshape(-1).tolist() if i not in special]
                text = tok.decode(self.ids, skip_special_tokens=True).strip()
                delta = text[len(self.sent):] if text.startswith(self.sent) else text
                if delta:     # the chunks concatenate to the final text
                    events.put(("chunk", delta, len(self.ids)))
                self.sent = text

            def end(self):
                pass

        def work():
            import torch

            try:
                with torch.no_grad(), attached(vlm, bundle):     # hooks of this thread only
                    vlm.model.generate(**self._gen_kwargs(vlm, prompt, n), streamer=Streamer())
                events.put(("end", None, 0))
            except BaseException as exc:  # noqa: BLE001
                events.put(("error", exc, 0))

        threading.Thread(target=work, name="editlens-stream", daemon=True).start()
        context.add_callback(stop.set)
        first, count = True, 0
        try:
            while True:
                try:
                    kind, payload, count_now = events.get(timeout=0.25)
                except queue.Empty:
                    if not context.is_active():
                        stop.set()
                        return
                    continue
                if kind == "chunk":
                    count = count_now
                    yield pb.GenerateChunk(text=payload, served=served if first else None, answer_tokens=count)
                    first = False
                elif kind == "end":
                    yield pb.GenerateChunk(served=served if first else None, done=True, answer_tokens=count)
                    return
                else:
                    raise payload
        finally:
            stop.set()

    # ---------------------------------------------------------------- edit
    def _multedit_config(self, opts: pb.MultEditOptions):
        from editors.multedit import MultEditConfig

        kw: dict[str, Any] = {"layer": opts.layer if opts.HasField("layer") else "auto"}
        for name in ("steps", "lr", "lam", "max_norm", "target_prob", "lr_scale"):
            if opts.HasField(name):
                kw[name] = getattr(opts, name)
        config = MultEditConfig(**kw)
        config.check(self.vlm)      # ValueError -> INVALID_ARGUMENT
        return config

    @rpc
    def Edit(self, request, context):
        self._auth(context)
        self._ready()
        adapter = self._adapter_name(request.adapter)
        visedit = request.editor == pb.EDITOR_VISEDIT
        image = self._image(request.image, "image", required=True)
        image2 = self._image(request.image_rephrase, "image_rephrase", required=False)
        question = self._text(request.question, "question")
        constraint = self._text(request.constraint, "constraint")
        answer = self._text(request.answer, "answer")
        rephrase = request.rephrase.strip() or None
        self._encode(question, image=image, answer=answer, constraints=[constraint])
        if rephrase:
            self._encode(rephrase, image=image, answer=answer, constraints=[constraint])
        if visedit:
            config = self._trained_visedit(request.visedit)
        else:
            config = self._multedit_config(request.multedit)
        args = dict(adapter=adapter, image=image, image2=image2, question=question, constraint=constraint,
                    answer=answer, rephrase=rephrase, config=config, promote=not request.no_promote,
                    description=request.description)
        job, ahead = self.jobs.submit("edit", lambda job: self._run_edit(job, **args), adapter=adapter)
        yield from _job_stream(job, ahead, context, pb.EditEvent, "edit")

    def _live_info(self, adapter: str):
        from registry import NotFoundError

        try:
            return self.registry.live(adapter)
        except NotFoundError:
            return None

    def _trained_visedit(self, opts: pb.VisEditOptions):
        """The trained VisEdit editor a VisEdit edit uses: the VisEdit edit set of ``editor_adapter``'s
        version (0: live). Its adapter weights are what every signal of the new version is read with."""
        name = opts.editor_adapter.strip()
        if not name:
            raise invalid("a VisEdit edit needs visedit.editor_adapter: the adapter that holds a trained VisEdit "
                          "editor (TrainVisEdit, or `editlens visedit train` registered with `editlens register`)")
        name = self._adapter_name(name)
        if opts.editor_version:
            version = opts.editor_version
        else:
            version = self._live_version(name)
            if version is _MISSING:
                raise not_found(f"adapter '{name}' not found (it should hold the trained VisEdit editor)")
            if version is None:
                raise not_found(f"adapter '{name}' has no live version; name visedit.editor_version")
        bundle = self._bundle(name, version)
        if bundle.visedit is None:
            raise precondition(f"adapter '{name}' version {version} holds no VisEdit editor (no "
                               f"{EDIT_SET_FILES['visedit']})")
        return {"editor_adapter": name, "editor_version": version, "trained": bundle.visedit}

    def _run_edit(self, job, adapter, image, image2, question, constraint, answer, rephrase, config, promote,
                  description) -> pb.Version:
        from editors.multedit import MultEdit
        from editors.request import EditRequest
        from editors.visedit import VisEdit
        from editors.visedit.edit_set import weights_digest
        from vlm.scoring import score_answers

        vlm = self.vlm
        name = "visedit" if isinstance(config, dict) else "multedit"
        live = self._live_info(adapter)              # fresh: the version this edit builds on
        base = self._bundle(adapter, live.version, live) if live is not None else None
        onto = base.edit_sets.get(name) if base is not None else None
        req = EditRequest(question, constraint, answer, image=image, rephrase=rephrase, image_rephrase=image2,
                          replacements=self.phrases)

        def progress(e) -> None:
            job.emit(e.stage, e.step, e.steps, e.edit, e.edits, e.loss)

        if name == "multedit":
            # computed on the model as it is served: the live version's other edits (VisEdit) attached
            with attached(vlm, base.only("visedit") if base is not None else None):
                new = MultEdit(vlm, config).edit_sequentially([req], onto=onto, progress=progress)
            evidence = new.hyperparameters.get("layer_evidence") if config.layer == "auto" else None
            hp = {k: v for k, v in new.hyperparameters.items() if k != "layer_evidence"}
        else:
            trained = config["trained"]
            if onto is not None and weights_digest(onto.vead) != weights_digest(trained.vead):
                raise precondition(f"the live version of '{adapter}' holds VisEdit edits made with another VisEdit "
                                   f"editor than '{config['editor_adapter']}' version {config['editor_version']}; "
                                   "edit it with that editor, or start another adapter")
            new = VisEdit(vlm, trained).edit([req], onto=onto, progress=progress)
            evidence = trained.training.get("layer_evidence")
            hp = {**{k: v for k, v in new.hyperparameters.items() if k != "layer_evidence"},
                  "editor_adapter": config["editor_adapter"], "editor_version": config["editor_version"]}
        job.check_cancelled()
        job.emit("score")
        extra: dict[str, float] = {}
        served_sets = {**(base.edit_sets if base is not None else {}), name: new}
        with attached(vlm, Bundle(adapter, 0, {}, served_sets)):
            for key, q, img in (("rephrase", rephrase, image), ("image_rephrase", question if image2 else None, image2)):
                if q is None:
                    continue
                s = score_answers(vlm, [self._encode(q, image=img, answer=answer)])[0]
                extra[f"p_{key}"] = s.prob
                extra[f"{key}_exact"] = float(s.exact)
        n_old = onto.num_edits if onto is not None else 0
        parent_manifest = live.manifest if live is not None else {}
        edits = []
        for rec in parent_manifest.get("edits", []):
            rec = dict(rec)
            rec["version"] = rec.get("version") or live.version
            edits.append(rec)
        for rec in new.records[n_old:]:
            rec = dict(rec)
            rec["metrics"] = {**rec.get("metrics", {}), **extra}
            edits.append({**rec, "version": None, "hyperparameters": hp, "layer_evidence": evidence,
                          "description": description})
        editors = [e for e in EDIT_SET_FILES if e in served_sets]
        job.emit("register", message=f"registering a new version of adapter '{adapter}'")
        with tempfile.TemporaryDirectory(prefix="editlens-edit-") as tmp:
            tmp = Path(tmp)
            files = {EDIT_SET_FILES[name]: tmp / EDIT_SET_FILES[name]}
            new.save(files[EDIT_SET_FILES[name]])
            if base is not None and base.folder is not None:      # carry the other editors' files over
                for editor_name, file_name in EDIT_SET_FILES.items():
                    if editor_name != name and (base.folder / file_name).is_file():
                        files[file_name] = base.folder / file_name
            if evidence is not None:
                try:
                    files["layer-evidence.png"] = self._evidence_figure(evidence, tmp / "layer-evidence.png")
                except Exception as exc:  # noqa: BLE001 - a figure never fails an edit
                    log.warning("could not render the layer evidence: %s", exc)
            manifest = {
                "format": "editlens.bundle", "format_version": 1, "adapter": adapter,
                "base_fingerprint": vlm.fingerprint, "base_model": str(vlm.path), "editors": editors,
                "parent": live.version if live is not None else None, "description": description,
                "files": sorted(set(files) | {"manifest.json"}), "num_edits": len(edits), "edits": edits,
            }
            job.check_cancelled()            # the last point at which a cancel leaves no trace
            info = self.registry.create_version(
                adapter, files, convert._json_safe(manifest), base_fingerprint=vlm.fingerprint,
                editor="+".join(editors), num_edits=len(edits), parent=manifest["parent"],
                description=description, set_live=promote)
        self._forget_live(adapter)
        try:      # load the new version now (from its registered files), so its first request is fast
            self._bundle(adapter, info.version, info)
        except Exception as exc:  # noqa: BLE001 - a request for it will report the problem
            log.warning("the new version %s of %s does not load: %s", info.version, adapter, exc)
        return convert.version(info)

    def _evidence_figure(self, evidence: dict, path: Path) -> Path:
        from diagnostics.render import render_bars

        if evidence.get("editor") == "visedit":
            details = evidence.get("details") or {}
            groups = {"module contribution (attention + MLP)": evidence["scores"]}
            if details.get("image_readout"):
                groups["image read-out"] = details["image_readout"]
            return render_bars(groups, [str(l) for l in range(len(evidence["scores"]))], path,
                               title=f"VEAD layer {evidence['layer']} (signal at {details.get('signal_layer')})",
                               ylabel="score")
        groups = {"isolated MLP effect": evidence["scores"]}
        plain = (evidence.get("details") or {}).get("mlp_effect_plain")
        if plain:
            groups["plain MLP effect"] = plain
        return render_bars(groups, [str(l) for l in range(len(evidence["scores"]))], path,
                           title=f"MultEdit layer {evidence['layer']} (causal trace at the constraint's last token)",
                           ylabel="indirect effect")

    _TRAIN_OPTIONS = {"signal_layer": int, "lr": float, "width": int, "heads": int, "synthetic": int,
                      "batch_size": int, "seed": int, "mapper_tied": boolean, "synthetic_locality": boolean,
                      "per_entity": int, "eval_every": int, "checkpoint_every": int, "im_tokens": int}

    @rpc
    def TrainVisEdit(self, request, context):
        from editors.visedit.train import TrainError, VisEditTrainConfig

        self._auth(context)
        vlm = self._ready()
        adapter = self._adapter_name(request.adapter or "visedit")
        world = Path(request.cases_path) if request.cases_path else Path(vlm.path).parent
        if not (world / "world.json").is_file() or not (world / "edit_cases" / "train.json").is_file():
            raise invalid(f"{world} is not a world folder (world.json and edit_cases/train.json): VisEdit trains on "
                          "a world's training split; give cases_path = such a folder")
        kw: dict[str, Any] = {"layer": request.layer if request.HasField("layer") else "auto"}
        if request.steps:
            kw["steps"] = int(request.steps)
        for key, value in request.options.items():
            if key not in self._TRAIN_OPTIONS:
                raise invalid(f"unknown training option {key!r}; known: {', '.join(sorted(self._TRAIN_OPTIONS))}")
            try:
                kw[key] = self._TRAIN_OPTIONS[key](value)
            except ValueError:
                raise invalid(f"training option {key}={value!r} is not a {self._TRAIN_OPTIONS[key].__name__}") from None
        try:
            config = VisEditTrainConfig(**kw)
            config.check()
            if config.layer != "auto" and not 0 <= config.layer < vlm.num_layers:
                raise TrainError(f"layer {config.layer} is outside 0..{vlm.num_layers - 1}")
        except (TrainError, TypeError) as exc:
            raise invalid(str(exc)) from None
        job, ahead = self.jobs.submit(
            "train", lambda job: self._run_training(job, adapter, world, config, not request.no_promote),
            adapter=adapter)
        yield from _job_stream(job, ahead, context, pb.TrainEvent, "training")

    def _run_training(self, job, adapter, world: Path, config, promote: bool) -> pb.Version:
        from editors.visedit.train import train_visedit

        def progress(p) -> None:
            job.emit(p.stage, p.step, p.steps, loss=p.losses.get("loss", p.validation_loss), message=p.message)

        with tempfile.TemporaryDirectory(prefix="editlens-visedit-") as tmp:
            summary = train_visedit(self.vlm, world, tmp, config, progress)
            job.check_cancelled()
            files = {EDIT_SET_FILES["visedit"]: Path(summary["adapter_path"]),
                     "training.json": Path(tmp) / "training.json"}
            evidence = summary.get("layer_evidence")
            if evidence is not None:
                try:
                    files["layer-evidence.png"] = self._evidence_figure(evidence, Path(tmp) / "layer-evidence.png")
                except Exception as exc:  # noqa: BLE001 - a figure never fails a job
                    log.warning("could not render the VEAD layer evidence: %s", exc)
            manifest = {"format": "editlens.bundle", "format_version": 1, "adapter": adapter,
                        "base_fingerprint": self.vlm.fingerprint, "base_model": str(self.vlm.path),
                        "editors": ["visedit"], "parent": None, "description": "a trained VisEdit editor",
                        "files": sorted(set(files) | {"manifest.json"}), "num_edits": 0, "edits": [],
                        "visedit_training": {k: v for k, v in summary.items() if k != "adapter_path"}}
            job.emit("register", message=f"registering the trained editor as a version of adapter '{adapter}'")
            info = self.registry.create_version(
                adapter, files, convert._json_safe(manifest), base_fingerprint=self.vlm.fingerprint,
                editor="visedit", num_edits=0, parent=None, description="a trained VisEdit editor",
                set_live=promote)
        self._forget_live(adapter)
        return convert.version(info)

    # ------------------------------------------------------------ versions
    @rpc
    def ListAdapters(self, request, context):
        self._ready()
        out = pb.ListAdaptersResponse(default_adapter=self.config.default_adapter)
        for name in self.registry.adapters():
            versions = self.registry.versions(name)
            live = next((v.version for v in versions if "live" in v.aliases), 0)
            out.adapters.append(pb.AdapterSummary(name=name, live_version=live,
                                                  latest_version=max((v.version for v in versions), default=0),
                                                  num_versions=len(versions)))
        return out

    @rpc
    def ListVersions(self, request, context):
        from registry import NotFoundError

        self._ready()
        adapter = self._adapter_name(request.adapter)
        try:
            infos = self.registry.versions(adapter)
        except NotFoundError:
            if request.adapter and request.adapter != self.config.default_adapter:
                raise
            infos = []                        # the default adapter before its first edit
        out = pb.ListVersionsResponse(adapter=adapter)
        for info in reversed(infos):
            out.versions.append(convert.version(info))
            for alias in info.aliases:
                out.aliases[alias] = info.version
        out.live_version = out.aliases.get("live", 0)
        return out

    @rpc
    def GetVersion(self, request, context):
        self._ready()
        adapter = self._adapter_name(request.adapter)
        which = request.WhichOneof("ref")
        ref: int | str = request.version if which == "version" else (request.alias if which == "alias" else "live")
        if which == "version" and request.version < 1:
            raise invalid("a version number is >= 1")
        info = self.registry.version(adapter, ref)
        folder = None
        if request.include_figures:
            try:
                folder = self.registry.download(adapter, info.version)
            except Exception as exc:  # noqa: BLE001
                raise BundleError(f"adapter '{adapter}' version {info.version}: cannot read its files: {exc}") from None
        return convert.version(info, figures_from=folder)

    @rpc
    def SetAlias(self, request, context):
        self._auth(context)
        self._ready()
        adapter = self._adapter_name(request.adapter)
        if request.version < 1:
            raise invalid("name the version to point the alias at (>= 1)")
        alias = request.alias or "live"
        with self.jobs.adapter_lock(adapter):
            info = self.registry.set_alias(adapter, alias, request.version)
        self._forget_live(adapter)
        return convert.version(info)

    @rpc
    def Rollback(self, request, context):
        self._auth(context)
        self._ready()
        adapter = self._adapter_name(request.adapter)
        from registry import LIVE, ConflictError

        with self.jobs.adapter_lock(adapter):
            before = self.registry.live_version_number(adapter, max_age=0)
            try:
                info = self.registry.rollback(adapter, request.to_version or None)
            except ConflictError:
                if before is None or request.to_version:
                    raise
                # live is the adapter's first version: rolling it back leaves no live version,
                # so the base model answers again (promote brings the version back)
                self.registry.delete_alias(adapter, LIVE)
                info = None
        self._forget_live(adapter)
        out = pb.RollbackResponse(previous_version=before or 0)
        if info is not None:
            out.live.CopyFrom(convert.version(info))
        return out

    @rpc
    def DeleteVersion(self, request, context):
        self._auth(context)
        self._ready()
        adapter = self._adapter_name(request.adapter)
        if request.version < 1:
            raise invalid("name the version to delete (>= 1)")
        with self.jobs.adapter_lock(adapter):
            self.registry.delete_version(adapter, request.version)
        self.bundles.drop(adapter, request.version)
        self._forget_live(adapter)
        return pb.DeleteVersionResponse(adapter=adapter, version=request.version)

    # ---------------------------------------------------------- diagnose
    _OPTION_FIELDS = ("kinds", "window", "isolate", "replacement", "relations", "layers", "samples", "noise_scale",
                      "seed", "editor", "image_block")

    def _diagnose_options(self, name: str, o: pb.DiagnoseOptions) -> dict:
        opts: dict[str, Any] = {}
        if o.kinds:
            opts["kinds"] = list(o.kinds)
        for f in ("window", "samples", "noise_scale", "seed", "image_block"):
            if o.HasField(f):
                opts[f] = getattr(o, f)
        if o.isolate:
            opts["isolate"] = True
        if o.replacement:
            opts["replacement"] = o.replacement
        if o.relations:
            opts["relations"] = list(o.relations)
        if o.layers:
            opts["early_layers" if name == "contributions" else "layers"] = list(o.layers)
        if o.editor:
            opts["editor"] = o.editor
        if "window" in opts and not 1 <= opts["window"] <= self.vlm.num_layers:
            raise invalid(f"window {opts['window']} is outside 1..{self.vlm.num_layers}")
        if opts.get("samples") is not None and not 1 <= opts["samples"] <= 64:
            raise invalid("samples must be in 1..64")
        return opts

    @rpc
    def Diagnose(self, request, context):
        from diagnostics.cases import DiagnosticCase
        from diagnostics.recommend import request_cases

        self._ready()
        name = convert.DIAGNOSTIC_NAMES.get(request.diagnostic)
        if name is None:
            raise invalid("name the diagnostic: trace, noise-trace, knockout, contributions, module-attribution, "
                          "visual-attribution or recommend")
        image = self._image(request.image, "image", required=True)
        question = self._text(request.question, "question")
        constraint = self._text(request.constraint, "constraint")
        answer = request.answer.strip() or None
        self._encode(question, image=image, constraints=[constraint])
        rephrase = request.rephrase.strip() or None
        image2 = self._image(request.image_rephrase, "image_rephrase", required=False)
        if rephrase:
            self._encode(rephrase, image=image, constraints=[constraint])
        options = self._diagnose_options(name, request.options)
        served, bundle = self._resolve(request.adapter if request.HasField("adapter") else None)
        if name == "recommend" and (rephrase or image2 is not None):
            cases = request_cases(question, constraint, image, rephrase=rephrase, image_rephrase=image2,
                                  replacements=self.phrases)
            for c in cases:
                c.answer = answer
        else:
            cases = [DiagnosticCase(question, constraint, image=image, answer=answer, label="request",
                                    replacements=list(self.phrases))]
        job, ahead = self.jobs.submit("diagnose", lambda job: self._run_diagnose(
            job, name, cases, options, bundle, served, request.png))
        yield pb.DiagnoseEvent(progress=pb.Progress(
            stage="queued", queue_position=ahead,
            message=f"{name} job {job.id} accepted" + (f"; {ahead} job(s) ahead" if ahead else "")))
        events = follow(job, context)
        while True:
            try:
                ev = next(events)
            except StopIteration as done:
                yield pb.DiagnoseEvent(result=done.value)
                return
            yield pb.DiagnoseEvent(progress=convert.progress(ev))

    def _run_diagnose(self, job, name, cases, options, bundle, served, png: bool) -> pb.DiagnoseResult:
        from diagnostics.report import run_diagnostic

        vlm = self.vlm

        def case_progress(done: int, total: int) -> None:
            job.emit("cases", done, total, item=max(0, done - 1), items=total)

        def cell_progress(done: int, total: int) -> None:
            job.emit("cells", done, total)

        job.emit(name, message=f"running {name}")
        with tempfile.TemporaryDirectory(prefix="editlens-diagnose-") as tmp, attached(vlm, bundle):
            out = Path(tmp) / "figure.png" if png else None
            report = run_diagnostic(vlm, name, cases, options, out, case_progress, cell_progress)
            figures = [pb.Figure(name=p.name.replace("figure", name, 1), png=Path(p).read_bytes())
                       for p in report.figures]
        result = pb.DiagnoseResult(diagnostic=[k for k, v in convert.DIAGNOSTIC_NAMES.items() if v == name][0],
                                   served=served, lines=report.lines, data_json=convert.to_json(report.data),
                                   figures=figures, seconds=report.seconds)
        for m in report.matrices:
            result.values.append(convert.matrix(m))
        result.scalars.update({k: v for k, v in report.scalars.items() if v == v})
        if report.recommended_layer is not None:
            result.recommended_layer = int(report.recommended_layer)
        for r in report.recommendations:
            rec = convert.recommendation(r)
            if rec is not None:
                result.recommendations.append(rec)
        return result

    # -------------------------------------------------------------- info
    @rpc
    def GetServerInfo(self, request, context):
        vlm = self.vlm
        lim = self.limits
        info = pb.ServerInfo(
            version=_version_string(), ready=self.vlm is not None and self.registry is not None,
            default_adapter=self.config.default_adapter, auth_required=bool(self.config.token),
            limits=pb.Limits(max_image_bytes=lim.max_image_bytes, max_image_pixels=lim.max_image_pixels,
                             max_prompt_tokens=self.max_prompt_tokens or 0, max_new_tokens=lim.max_new_tokens,
                             max_queued_jobs=lim.max_queued_jobs, max_message_bytes=lim.max_message_bytes),
            registry_uri=getattr(self.registry, "tracking_uri", "") or "", editors=["multedit"],
            jobs_running=self.jobs.running, jobs_queued=self.jobs.queued)
        if vlm is not None:
            info.model_path, info.base_fingerprint = str(vlm.path), vlm.fingerprint
            info.num_layers, info.device, info.dtype = vlm.num_layers, str(vlm.device), str(vlm.dtype).replace("torch.", "")
        return info
