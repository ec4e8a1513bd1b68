"""The adapter registry on the MLflow Model Registry.

One registered model per adapter lineage (tagged ``editlens.kind=adapter``); each version is
an MLflow model version whose source is the artifact folder of one run in the experiment
``editlens-adapters``. The run's artifacts are the version's files: the edit sets
(``*.safetensors``), ``manifest.json`` and optional PNGs. Version tags carry the base-model
fingerprint, the editor, the number of edits, the parent version (and the one a delta version's
files build on, which cannot be deleted before it), the file list and the sha256 of every file.
The alias ``live`` is what the server serves; the registered-model tag ``editlens.live_history``
keeps the versions that were live before (newest last), which is what ``rollback()`` walks back.

Embedded default: ``sqlite:///<data_dir>/mlflow.db`` (WAL journal) with artifacts in
``<data_dir>/artifacts``; the experiment is created on the first ``create_version`` with that
explicit artifact location, so a copied empty database (tests' template) records the copy's
own folder. Any other tracking URI (``http://host:5000`` of an ``mlflow server``, a database
URI) works the same; with an HTTP server the server decides where artifacts go.

The pieces around the lifecycle live beside this module: ``names`` (tags, aliases, name checks),
``mlflow_env`` (the embedded database, MLflow's import and environment, the MLflow plumbing),
``artifacts`` (checksums, the download cache, verification) and ``consistency`` (the crash check).

MLflow is imported only when a Registry is constructed.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .artifacts import ArtifactFiles, sha256_file
from .consistency import ConsistencyCheck
from .errors import (
    AliasNotFoundError,
    ConflictError,
    InvalidArgumentError,
    RegistryError,
    StaleParentError,
    from_mlflow,
)
from .mlflow_env import (
    DB_NAME,
    MLFLOW_ENVIRONMENT,
    MlflowPlumbing,
    _import_mlflow,
    _is_database_uri,
    _mlflow_code,
    _redact,
    _sqlite_path,
    copy_database,
    default_data_dir,
    editlens_home,
    enable_wal,
    quiet_mlflow,
)
from .names import (
    ALLOWED_SUFFIXES,
    EXPERIMENT_NAME,
    FORMAT_VERSION,
    HISTORY_LIMIT,
    KIND_ADAPTER,
    LIVE,
    MANIFEST,
    TAG_AUDIT,
    TAG_BASE,
    TAG_DELTA_OF,
    TAG_EDITOR,
    TAG_FILES,
    TAG_FORMAT,
    TAG_HISTORY,
    TAG_KIND,
    TAG_NUM_EDITS,
    TAG_PARENT,
    TAG_SHA256,
    check_adapter_name,
    check_alias,
    check_version_inputs,
    check_version_number,
    parse_ref,
)
from .version_info import VersionInfo

# what this module defined before it was split (issue 27), importable from here as before
__all__ = [
    "ALLOWED_SUFFIXES",
    "DB_NAME",
    "EXPERIMENT_NAME",
    "FORMAT_VERSION",
    "HISTORY_LIMIT",
    "KIND_ADAPTER",
    "LIVE",
    "MANIFEST",
    "MLFLOW_ENVIRONMENT",
    "TAG_AUDIT",
    "TAG_BASE",
    "TAG_EDITOR",
    "TAG_FILES",
    "TAG_FORMAT",
    "TAG_HISTORY",
    "TAG_KIND",
    "TAG_NUM_EDITS",
    "TAG_PARENT",
    "TAG_SHA256",
    "Registry",
    "check_adapter_name",
    "check_alias",
    "check_version_number",
    "copy_database",
    "default_data_dir",
    "editlens_home",
    "enable_wal",
    "parse_ref",
    "quiet_mlflow",
    "sha256_file",
]

log = logging.getLogger(__name__)


class Registry(MlflowPlumbing, ArtifactFiles, ConsistencyCheck):
    """Versioned adapters (edit sets) in the MLflow Model Registry. Thread-safe.

    tracking_uri: None -> the embedded default ``sqlite:///<data_dir>/mlflow.db`` with
    artifacts in ``<data_dir>/artifacts``; or any MLflow tracking URI (``http://host:5000``,
    ``postgresql://...``, ``sqlite:///...``), used as the registry URI too.
    data_dir: default ``$EDITLENS_HOME/registry``; holds the embedded database and artifacts,
    and in every mode the download cache ``<data_dir>/cache/<adapter>/<version>``.
    artifact_location: where the experiment stores artifacts; default ``<data_dir>/artifacts``
    for database URIs, the server's default for HTTP servers.
    Every read asks MLflow; the server caches the live alias for a short while itself
    (``server.versions``), so the registry holds no cache that could go stale.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        data_dir: str | Path | None = None,
        *,
        artifact_location: str | Path | None = None,
    ):
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
        self.embedded = tracking_uri is None
        if tracking_uri is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{self.data_dir / DB_NAME}"
        if not isinstance(tracking_uri, str) or not tracking_uri.strip():
            raise InvalidArgumentError(f"invalid tracking URI {tracking_uri!r}")
        self.tracking_uri = tracking_uri
        db = _sqlite_path(tracking_uri)
        if db is not None:
            try:
                enable_wal(db)
            except sqlite3.Error as e:
                raise RegistryError(f"cannot open the registry database {db}: {e}") from e
        if artifact_location is None and _is_database_uri(tracking_uri):
            artifact_location = self.data_dir / "artifacts"
        if isinstance(artifact_location, Path) or (
            isinstance(artifact_location, str)
            and "://" not in artifact_location
            and not artifact_location.startswith(("file:", "mlflow-artifacts:"))
        ):
            artifact_location = Path(artifact_location).expanduser().resolve().as_uri()
        self.artifact_location: str | None = artifact_location
        self.cache_dir = self.data_dir / "cache"

        self._mlflow, client_cls = _import_mlflow()
        try:  # MLflow 3 builds the stores here: a new sqlite database is migrated (seconds)
            self._client = client_cls(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        except Exception as e:
            raise from_mlflow(e, f"cannot open the MLflow registry at {_redact(tracking_uri)}") from e
        self._lock = threading.RLock()  # serialises mutations (read-modify-write of aliases/history)
        self._init_lock = threading.Lock()
        self._ready = False
        self._experiment_id: str | None = None
        self._manifests: dict[tuple[str, int, str], dict] = {}
        self._dl_locks: dict[tuple[str, int], threading.Lock] = {}  # one download per version at a time
        self._dl_guard = threading.Lock()

    def __repr__(self) -> str:
        return f"Registry(tracking_uri={_redact(self.tracking_uri)!r}, data_dir={str(self.data_dir)!r})"

    # -- MLflow plumbing (the rest: mlflow_env.MlflowPlumbing) -----------------------------

    def _info(self, mv, aliases: Iterable[str] | None = None) -> VersionInfo:
        tags = dict(mv.tags or {})
        parent = tags.get(TAG_PARENT, "")
        try:
            files = json.loads(tags.get(TAG_FILES, "[]"))
            sha = json.loads(tags.get(TAG_SHA256, "{}"))
        except ValueError:
            files, sha = [], {}
        adapter, version = mv.name, int(mv.version)
        run_id, source = mv.run_id or "", mv.source
        return VersionInfo(
            adapter=adapter,
            version=version,
            aliases=sorted(aliases if aliases is not None else (mv.aliases or [])),
            created=(mv.creation_timestamp or 0) / 1000.0,
            base_fingerprint=tags.get(TAG_BASE, ""),
            editor=tags.get(TAG_EDITOR, ""),
            num_edits=int(tags.get(TAG_NUM_EDITS, "0") or 0),
            parent=int(parent) if parent.isdigit() else None,
            delta_of=int(tags[TAG_DELTA_OF]) if tags.get(TAG_DELTA_OF, "").isdigit() else None,
            description=mv.description or "",
            files=files,
            sha256=sha,
            manifest_loader=lambda: self._load_manifest(adapter, version, run_id, source, sha),
        )

    # -- reading ---------------------------------------------------------------------------

    def adapters(self) -> list[str]:
        """Names of all adapters (registered models tagged as EditLens adapters), sorted."""
        names, token = [], None
        flt = f"tags.`{TAG_KIND}` = '{KIND_ADAPTER}'"
        while True:
            page = self._call(
                "adapters",
                lambda token=token: self.client.search_registered_models(
                    filter_string=flt, max_results=1000, page_token=token
                ),
            )
            names.extend(m.name for m in page)
            token = getattr(page, "token", None)
            if not token:
                return sorted(names)

    def versions(self, adapter: str) -> list[VersionInfo]:
        """All versions of an adapter, ascending (manifests load lazily)."""
        check_adapter_name(adapter)
        # search results carry no aliases: they come from the registered model (which also
        # raises NotFoundError for an unknown adapter)
        aliases = self._aliases_by_version(adapter)
        mvs = [mv for mv in self._search_versions(adapter) if str(mv.status) == "READY"]
        infos = [self._info(mv, aliases.get(int(mv.version), [])) for mv in mvs]
        return sorted(infos, key=lambda i: i.version)

    def _aliases_by_version(self, adapter: str) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for alias, v in (self._registered_model(adapter).aliases or {}).items():
            out.setdefault(int(v), []).append(alias)
        return out

    def version(self, adapter: str, ref: str | int) -> VersionInfo:
        """One version by number (3, "3", "v3") or alias ("live")."""
        check_adapter_name(adapter)
        r = parse_ref(ref)
        mv = self._model_version(adapter, r) if isinstance(r, int) else self._version_by_alias(adapter, r)
        return self._info(mv)

    def live(self, adapter: str) -> VersionInfo | None:
        """The live version; None when the adapter has none. NotFoundError for an unknown adapter."""
        check_adapter_name(adapter)
        try:
            info = self._info(self._version_by_alias(adapter, LIVE))
        except AliasNotFoundError:
            info = None
        return info

    def live_version_number(self, adapter: str) -> int | None:
        """The live version's number (None if no live alias); NotFoundError for an unknown adapter."""
        check_adapter_name(adapter)
        rm = self._registered_model(adapter)
        v = (rm.aliases or {}).get(LIVE)
        number = int(v) if v is not None else None
        return number

    # -- writing ---------------------------------------------------------------------------

    def create_version(
        self,
        adapter: str,
        files: dict[str, Path],
        manifest: dict,
        *,
        base_fingerprint: str,
        editor: str,
        num_edits: int,
        parent: int | None,
        description: str = "",
        set_live: bool = True,
        parent_must_be_live: bool = False,
        delta_of: int | None = None,
    ) -> VersionInfo:
        """Register a new immutable version built from local ``files`` (artifact name -> path)
        and ``manifest`` (written as manifest.json). Creates the adapter if absent. All or
        nothing: on any failure no run, version or new adapter is left behind and the live
        alias is unchanged. With ``set_live`` the new version becomes live; with
        ``parent_must_be_live`` only if ``parent`` (None: no version) is still the live version
        when it is about to move — read from the tracking store right before the alias moves, so
        that of two replicas editing one adapter at once the second raises ``StaleParentError``
        instead of making live a version that lacks the first one's edit. ``delta_of``: the version whose files
        this one's build on (a delta version); that version cannot be deleted while this one exists."""
        check_adapter_name(adapter)
        staged = check_version_inputs(files, manifest, base_fingerprint, editor, num_edits, parent, description)
        with tempfile.TemporaryDirectory(prefix="editlens-stage-") as tmp:
            stage = Path(tmp)
            sha: dict[str, str] = {}
            for name, src in staged.items():
                try:
                    shutil.copyfile(src, stage / name)
                except OSError as e:
                    raise InvalidArgumentError(f"cannot read file '{name}' ({src}): {e.strerror or e}") from e
                sha[name] = sha256_file(stage / name)
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
            sha[MANIFEST] = sha256_file(stage / MANIFEST)
            names = sorted(sha)
            tags = {
                TAG_BASE: base_fingerprint,
                TAG_EDITOR: editor,
                TAG_NUM_EDITS: str(num_edits),
                TAG_PARENT: "" if parent is None else str(parent),
                TAG_FILES: json.dumps(names),
                TAG_SHA256: json.dumps(sha, sort_keys=True),
                TAG_FORMAT: FORMAT_VERSION,
                **({TAG_DELTA_OF: str(delta_of)} if delta_of is not None else {}),
            }
            with self._lock:
                exp_id = self._experiment()
                created_model = self._ensure_adapter(adapter, base_fingerprint)
                run_id = mv = None
                try:
                    for needed in {parent, delta_of} - {None}:
                        self._model_version(adapter, needed)
                    c = self.client
                    run = c.create_run(exp_id, run_name=adapter, tags={"editlens.adapter": adapter})
                    run_id = run.info.run_id
                    c.log_artifacts(run_id, str(stage))
                    c.set_terminated(run_id, "FINISHED")
                    mv = c.create_model_version(
                        adapter, source=run.info.artifact_uri, run_id=run_id, tags=tags, description=description
                    )
                    if str(mv.status) != "READY":  # create_model_version waited; it did not get there
                        raise RegistryError(f"adapter '{adapter}': the new version is {mv.status}, not READY")
                    version = int(mv.version)
                    if set_live and parent_must_be_live:
                        now = self._registered_model(adapter).aliases or {}
                        live_now = int(now[LIVE]) if LIVE in now else None
                        if live_now != parent:
                            raise StaleParentError(
                                f"adapter '{adapter}': version {live_now} became live while this version was being "
                                f"made on {'the base model' if parent is None else f'version {parent}'}; nothing "
                                "was registered. Retry: the edit will build on the new live version"
                            )
                    if set_live:
                        self._move_live(adapter, version, push_current=True)
                except BaseException as e:
                    self._undo_create(adapter, mv, run_id, created_model)
                    if isinstance(e, RegistryError) or not isinstance(e, Exception):
                        raise
                    raise from_mlflow(e, f"adapter '{adapter}': creating a version failed") from e
        info = self._info(mv, [LIVE] if set_live else [])
        info.loaded_manifest = manifest
        self._manifests[(adapter, info.version, run_id)] = manifest
        return info

    def _ensure_adapter(self, adapter: str, base_fingerprint: str) -> bool:
        """Create the registered model if absent (True if created here); refuse names taken by
        other models and base fingerprints that differ from the adapter's."""
        c = self.client
        try:
            rm = c.get_registered_model(adapter)
        except Exception as e:
            if _mlflow_code(e) not in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}:
                raise from_mlflow(e, f"adapter '{adapter}'") from e
            rm = None
        if rm is None:
            try:
                c.create_registered_model(
                    adapter,
                    tags={TAG_KIND: KIND_ADAPTER, TAG_BASE: base_fingerprint},
                    description=f"EditLens adapter for base model {base_fingerprint}",
                )
                return True
            except Exception as e:
                if _mlflow_code(e) != "RESOURCE_ALREADY_EXISTS":
                    raise from_mlflow(e, f"adapter '{adapter}'") from e
                rm = self._registered_model(adapter)  # another replica created it meanwhile
        tags = rm.tags or {}
        if tags.get(TAG_KIND) != KIND_ADAPTER:
            raise ConflictError(f"registered model '{adapter}' exists and is not an EditLens adapter")
        if tags.get(TAG_BASE) and tags[TAG_BASE] != base_fingerprint:
            raise ConflictError(f"adapter '{adapter}' belongs to base model {tags[TAG_BASE]}, not {base_fingerprint}")
        return False

    def _undo_create(self, adapter: str, mv, run_id: str | None, created_model: bool) -> None:
        c = self._client
        steps = []
        if mv is not None:
            steps.append(("model version", lambda: c.delete_model_version(adapter, mv.version)))
        if run_id is not None:
            steps.append(("artifacts", lambda: self._delete_run(run_id)))
        if created_model:
            steps.append(("registered model", lambda: c.delete_registered_model(adapter)))
        for what, fn in steps:
            try:
                fn()
            except Exception as e:  # keep cleaning; the original error is what the caller sees
                log.error("cleaning up a failed version of '%s': could not delete the %s: %s", adapter, what, e)

    def set_alias(self, adapter: str, alias: str, version: int) -> VersionInfo:
        """Point ``alias`` at ``version`` (promote). Moving ``live`` records the previous live
        version in the rollback history."""
        check_adapter_name(adapter)
        check_alias(alias)
        check_version_number(version)
        with self._lock:
            self._model_version(adapter, version)  # NotFoundError for a missing target
            if alias == LIVE:
                self._move_live(adapter, version, push_current=True)
            else:
                self._call(
                    f"adapter '{adapter}' alias '{alias}'",
                    lambda: self.client.set_registered_model_alias(adapter, alias, str(version)),
                )
            return self._info(self._model_version(adapter, version))

    def audit(self, adapter: str, event: dict[str, Any]) -> None:
        """Record one mutation of ``adapter`` (what, when, by whom) as a tag of the adapter; never raises for
        an adapter that is gone (a delete of its last version removes it)."""
        check_adapter_name(adapter)
        key = f"{TAG_AUDIT}{time.time_ns()}"
        try:
            self.client.set_registered_model_tag(adapter, key, json.dumps(event, sort_keys=True))
        except Exception as e:  # the mutation itself has happened; a missing audit entry is logged
            log.warning("could not record the audit entry %s of adapter '%s': %s", event, adapter, e)

    def audit_log(self, adapter: str) -> list[dict[str, Any]]:
        """Every recorded mutation of ``adapter``, oldest first."""
        check_adapter_name(adapter)
        tags = self._registered_model(adapter).tags or {}
        out = []
        for key in sorted((k for k in tags if k.startswith(TAG_AUDIT)), key=lambda k: int(k[len(TAG_AUDIT) :])):
            try:
                out.append(json.loads(tags[key]))
            except json.JSONDecodeError:
                out.append({"unreadable": tags[key]})
        return out

    def delete_alias(self, adapter: str, alias: str) -> None:
        """Remove ``alias`` from the adapter (NotFoundError when it has no such alias)."""
        check_adapter_name(adapter)
        check_alias(alias)
        with self._lock:
            self._version_by_alias(adapter, alias)
            self._call(
                f"adapter '{adapter}' alias '{alias}'",
                lambda: self.client.delete_registered_model_alias(adapter, alias),
            )

    @staticmethod
    def _history(rm) -> list[int]:
        try:
            return [int(v) for v in json.loads((rm.tags or {}).get(TAG_HISTORY, "[]"))]
        except (ValueError, TypeError):
            return []

    def _move_live(self, adapter: str, version: int, *, push_current: bool, history: list[int] | None = None) -> None:
        """Set live -> version and update the history (caller holds the lock). If the history
        cannot be written, the alias is put back."""
        c = self.client
        rm = self._registered_model(adapter)
        current = (rm.aliases or {}).get(LIVE)
        current = int(current) if current is not None else None
        new_history = list(self._history(rm) if history is None else history)
        if push_current and current is not None and current != version:
            new_history = (new_history + [current])[-HISTORY_LIMIT:]
        self._call(
            f"adapter '{adapter}' alias 'live'", lambda: c.set_registered_model_alias(adapter, LIVE, str(version))
        )
        if new_history != self._history(rm):
            try:
                c.set_registered_model_tag(adapter, TAG_HISTORY, json.dumps(new_history))
            except Exception as e:
                if current is None:
                    c.delete_registered_model_alias(adapter, LIVE)
                else:
                    c.set_registered_model_alias(adapter, LIVE, str(current))
                raise from_mlflow(e, f"adapter '{adapter}': recording the live history") from e

    def rollback(self, adapter: str, to: int | str | None = None, to_base: bool = False) -> VersionInfo | None:
        """Move ``live`` back. to=None: to the version that was live before the current one
        (an undo: the history entry is consumed, deleted versions are skipped); with no
        history, to the highest existing version below the current one; when there is none,
        ConflictError — or, with ``to_base``, no live version at all (the base model answers;
        returns None). to=N / "vN" / alias: to that version (recorded in the history like a
        promote). Returns the new live version."""
        check_adapter_name(adapter)
        with self._lock:
            if to is not None:
                r = parse_ref(to)
                target = r if isinstance(r, int) else int(self._version_by_alias(adapter, r).version)
                self._model_version(adapter, target)
                self._move_live(adapter, target, push_current=True)
                return self._info(self._model_version(adapter, target))
            rm = self._registered_model(adapter)
            current = (rm.aliases or {}).get(LIVE)
            if current is None:
                raise ConflictError(
                    f"adapter '{adapter}' has no live version to roll back from; name the version to make live"
                )
            current = int(current)
            existing = {int(mv.version) for mv in self._search_versions(adapter)}
            history = self._history(rm)
            target = None
            while history:
                v = history.pop()
                if v != current and v in existing:
                    target = v
                    break
            if target is None:
                lower = [v for v in existing if v < current]
                if not lower and to_base:
                    self.delete_alias(adapter, LIVE)
                    return None
                if not lower:
                    raise ConflictError(
                        f"adapter '{adapter}': nothing to roll back to (live is "
                        f"version {current} and no earlier version exists)"
                    )
                target = max(lower)
            self._move_live(adapter, target, push_current=False, history=history)
            return self._info(self._model_version(adapter, target))

    def delete_version(self, adapter: str, version: int) -> None:
        """Delete a version (its run and artifacts too). The live version cannot be deleted."""
        check_adapter_name(adapter)
        check_version_number(version)
        with self._lock:
            mv = self._model_version(adapter, version)
            rm = self._registered_model(adapter)
            live = (rm.aliases or {}).get(LIVE)
            if live is not None and int(live) == version:
                raise ConflictError(
                    f"version {version} of adapter '{adapter}' is live; roll back or "
                    "promote another version before deleting it"
                )
            dependents = sorted(
                int(v.version)
                for v in self._search_versions(adapter)
                if (v.tags or {}).get(TAG_DELTA_OF) == str(version)
            )
            if dependents:
                raise ConflictError(
                    f"version {version} of adapter '{adapter}' holds the files that delta versions "
                    f"{', '.join(map(str, dependents))} build on; squash them first (`editlens registry squash "
                    f"{adapter} VERSION` writes a version whole) or delete them"
                )
            self._call(
                f"adapter '{adapter}' version {version}",
                lambda: self.client.delete_model_version(adapter, str(version)),
            )
            history = self._history(rm)
            if version in history:
                try:
                    self.client.set_registered_model_tag(
                        adapter, TAG_HISTORY, json.dumps([v for v in history if v != version])
                    )
                except Exception as e:  # rollback skips deleted versions anyway
                    log.debug("could not prune the live history of %s: %s", adapter, e)
            if mv.run_id:
                try:
                    self._delete_run(mv.run_id)
                except Exception as e:
                    log.warning("version %s of %s deleted; its run %s could not be: %s", version, adapter, mv.run_id, e)
            self._forget(adapter, version)

    def delete_adapter(self, adapter: str) -> None:
        """Delete an adapter with all its versions, runs and artifacts."""
        check_adapter_name(adapter)
        with self._lock:
            rm = self._registered_model(adapter)
            if (rm.tags or {}).get(TAG_KIND) != KIND_ADAPTER:
                raise ConflictError(f"registered model '{adapter}' is not an EditLens adapter; not deleting it")
            runs = [mv.run_id for mv in self._search_versions(adapter) if mv.run_id]
            self._call(
                f"adapter '{adapter}'",
                lambda: self.client.delete_registered_model(adapter),
                not_found=f"adapter '{adapter}' not found",
            )
            for run_id in runs:
                try:
                    self._delete_run(run_id)
                except Exception as e:
                    log.warning("adapter %s deleted; its run %s could not be: %s", adapter, run_id, e)
            self._forget(adapter, None)

    def _forget(self, adapter: str, version: int | None) -> None:
        for key in [k for k in self._manifests if k[0] == adapter and (version is None or k[1] == version)]:
            self._manifests.pop(key, None)
        self.clear_cache(adapter, version)
