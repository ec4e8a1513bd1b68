"""The adapter registry on the MLflow Model Registry.

One registered model per adapter lineage (tagged ``editlens.kind=adapter``); each version is
an MLflow model version whose source is the artifact folder of one run in the experiment
``editlens-adapters``. The run's artifacts are the version's files: the edit sets
(``*.safetensors``), ``manifest.json`` and optional PNGs. Version tags carry the base-model
fingerprint, the editor, the number of edits, the parent version, the file list and the
sha256 of every file. The alias ``live`` is what the server serves; the registered-model tag
``editlens.live_history`` keeps the versions that were live before (newest last), which is
what ``rollback()`` walks back.

Embedded default: ``sqlite:///<data_dir>/mlflow.db`` (WAL journal) with artifacts in
``<data_dir>/artifacts``; the experiment is created on the first ``create_version`` with that
explicit artifact location, so a copied empty database (tests' template) records the copy's
own folder. Any other tracking URI (``http://host:5000`` of an ``mlflow server``, a database
URI) works the same; with an HTTP server the server decides where artifacts go.

MLflow is imported only when a Registry is constructed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .errors import (
    AliasNotFoundError,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    RegistryError,
    StaleParentError,
    from_mlflow,
)
from .version_info import VersionInfo

log = logging.getLogger(__name__)

EXPERIMENT_NAME = "editlens-adapters"
LIVE = "live"
MANIFEST = "manifest.json"
DB_NAME = "mlflow.db"

TAG_KIND = "editlens.kind"
KIND_ADAPTER = "adapter"
TAG_BASE = "editlens.base_fingerprint"
TAG_EDITOR = "editlens.editor"
TAG_NUM_EDITS = "editlens.num_edits"
TAG_PARENT = "editlens.parent"
TAG_FILES = "editlens.files"
TAG_SHA256 = "editlens.sha256"
TAG_HISTORY = "editlens.live_history"
TAG_FORMAT = "editlens.format"
TAG_AUDIT = "editlens.audit."  # + a nanosecond timestamp: one registered-model tag per mutation
FORMAT_VERSION = "1"
HISTORY_LIMIT = 100

#: File types a version may hold: edit sets, manifests, figures, notes. No pickle anywhere.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".png", ".txt", ".md")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_REF_RE = re.compile(r"^[vV]?(\d{1,9})$")
_CACHE_MARKER = ".editlens-version.json"


# ----------------------------------------------------------------------------------------------
# helpers


def editlens_home() -> Path:
    """$EDITLENS_HOME, default ~/.cache/editlens (the same rule as vlm/world/build.py, kept
    here so that the registry does not import the model stack)."""
    return Path(os.environ.get("EDITLENS_HOME", Path.home() / ".cache" / "editlens")).expanduser()


def default_data_dir() -> Path:
    """The embedded registry's folder: ``$EDITLENS_HOME/registry``."""
    return editlens_home() / "registry"


def check_adapter_name(adapter: Any) -> str:
    """``adapter`` when it is a valid adapter name; ``InvalidArgumentError`` otherwise."""
    if not isinstance(adapter, str) or not _NAME_RE.match(adapter):
        raise InvalidArgumentError(
            f"invalid adapter name {adapter!r}: use 1-64 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return adapter


def check_alias(alias: Any) -> str:
    """``alias`` when it is a valid alias; ``InvalidArgumentError`` otherwise."""
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias):
        raise InvalidArgumentError(
            f"invalid alias {alias!r}: use 1-64 letters, digits, '-' or '_', starting with a letter"
        )
    if alias.lower() == "latest" or _VERSION_REF_RE.match(alias):
        raise InvalidArgumentError(f"invalid alias {alias!r}: 'latest' and 'v<number>' are reserved")
    return alias


def check_version_number(version: Any) -> int:
    """``version`` as an int >= 1; ``InvalidArgumentError`` otherwise."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidArgumentError(f"invalid version {version!r}: a version is a positive integer")
    return version


def parse_ref(ref: Any) -> int | str:
    """A version reference: 3, "3", "v3" -> 3; an alias name ("live") -> the alias."""
    if isinstance(ref, bool):
        raise InvalidArgumentError(f"invalid version reference {ref!r}")
    if isinstance(ref, int):
        return check_version_number(ref)
    if isinstance(ref, str):
        m = _VERSION_REF_RE.match(ref.strip())
        if m:
            return check_version_number(int(m.group(1)))
        if _ALIAS_RE.match(ref) and ref.lower() != "latest":
            return ref
    raise InvalidArgumentError(
        f"invalid version reference {ref!r}: give a version number (3 or 'v3') or an alias (e.g. 'live')"
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _is_database_uri(uri: str) -> bool:
    scheme = urlparse(uri).scheme.split("+")[0]
    return scheme in {"sqlite", "postgresql", "mysql", "mssql"}


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    p = uri[len("sqlite:///") :]
    if not p or p == ":memory:":
        return None
    return Path(unquote(p.split("?")[0]))


def _redact(uri: str) -> str:
    """A URI without its password, for messages."""
    p = urlparse(uri)
    if p.password:
        return uri.replace(f":{p.password}@", ":***@", 1)
    return uri


def enable_wal(db_path: Path) -> None:
    """Switch a sqlite database to WAL journaling (persistent in the file): readers (the
    server's per-request live lookups) then never wait for a writer (an edit job)."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(db_path), timeout=30)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def copy_database(src_db: str | Path, dst_db: str | Path) -> Path:
    """Copy a sqlite registry database consistently (sqlite's online backup, so a WAL file
    beside the source is included). Used to start registries from a migrated template."""
    dst = Path(dst_db)
    dst.parent.mkdir(parents=True, exist_ok=True)
    src = sqlite3.connect(str(src_db))
    try:
        out = sqlite3.connect(str(dst))
        try:
            src.backup(out)
        finally:
            out.close()
    finally:
        src.close()
    return dst


_quiet_lock = threading.Lock()
_quieted = False


#: What an EditLens process sets for MLflow before importing it (``quiet_mlflow``): no telemetry (these
#: machines have no network, and a service should not phone home), no progress bars or "View run at" lines
#: (they would corrupt the CLI's --json output), and a dead tracking server failing in seconds, not minutes.
MLFLOW_ENVIRONMENT = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def quiet_mlflow(environ=None) -> None:
    """Apply ``MLFLOW_ENVIRONMENT`` (without overriding what is set already). The process decides: the
    ``editlens`` command and the test suite call this; a program that embeds the registry may or may not."""
    environ = os.environ if environ is None else environ
    for key, value in MLFLOW_ENVIRONMENT.items():
        environ.setdefault(key, value)


def _import_mlflow():
    """Import MLflow with its loggers and warnings turned down (errors still surface: we raise them)."""
    global _quieted
    with _quiet_lock:
        if not _quieted:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import mlflow
                from mlflow.tracking import MlflowClient
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"mlflow(\.|$)")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow(\.|$)")
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow(\.|$)")
            _quieted = True
    import mlflow
    from mlflow.tracking import MlflowClient

    return mlflow, MlflowClient


def _mlflow_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


# ----------------------------------------------------------------------------------------------


class Registry:
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

    # -- MLflow plumbing -------------------------------------------------------------------

    @property
    def client(self):
        """The MlflowClient, with its stores initialised (database migrated) exactly once."""
        self.check()
        return self._client

    def check(self) -> None:
        """Connect (and for a new database, migrate it) once; raises RegistryError when unreachable."""
        if not self._ready:
            with self._init_lock:
                if not self._ready:
                    self._call("MLflow tracking store", lambda: self._client.search_experiments(max_results=1))
                    self._call("MLflow model registry", lambda: self._client.search_registered_models(max_results=1))
                    self._ready = True

    @staticmethod
    def _call(what: str, fn, *, not_found: str | None = None):
        try:
            return fn()
        except RegistryError:
            raise
        except Exception as e:  # MlflowException, requests errors, OSError from artifact stores
            if not_found is not None and _mlflow_code(e) in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}:
                raise NotFoundError(not_found) from e
            raise from_mlflow(e, what) from e

    def _experiment(self) -> str:
        if self._experiment_id is not None:
            return self._experiment_id
        with self._lock:
            if self._experiment_id is not None:
                return self._experiment_id
            c = self.client
            exp = self._call("experiment", lambda: c.get_experiment_by_name(EXPERIMENT_NAME))
            if exp is None:
                try:
                    exp_id = c.create_experiment(
                        EXPERIMENT_NAME, artifact_location=self.artifact_location, tags={TAG_KIND: "adapters"}
                    )
                except Exception as e:
                    if _mlflow_code(e) != "RESOURCE_ALREADY_EXISTS":  # another replica was faster
                        raise from_mlflow(e, f"experiment '{EXPERIMENT_NAME}'") from e
                    exp_id = c.get_experiment_by_name(EXPERIMENT_NAME).experiment_id
            else:
                exp_id = exp.experiment_id
                if exp.lifecycle_stage == "deleted":
                    self._call("experiment", lambda: c.restore_experiment(exp_id))
                if (
                    self.embedded
                    and self.artifact_location
                    and exp.artifact_location.rstrip("/") != self.artifact_location.rstrip("/")
                ):
                    log.warning(
                        "registry experiment stores artifacts in %s, not in %s (was the "
                        "database copied from another folder?)",
                        exp.artifact_location,
                        self.artifact_location,
                    )
            self._experiment_id = exp_id
            return exp_id

    def _registered_model(self, adapter: str):
        return self._call(
            f"adapter '{adapter}'",
            lambda: self.client.get_registered_model(adapter),
            not_found=f"adapter '{adapter}' not found",
        )

    def _model_version(self, adapter: str, version: int):
        try:
            return self.client.get_model_version(adapter, str(version))
        except Exception as e:
            if _mlflow_code(e) in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}:
                self._registered_model(adapter)  # raises "adapter not found" if that is the cause
                raise NotFoundError(f"adapter '{adapter}' has no version {version}") from e
            raise from_mlflow(e, f"adapter '{adapter}' version {version}") from e

    def _version_by_alias(self, adapter: str, alias: str):
        try:
            return self.client.get_model_version_by_alias(adapter, alias)
        except Exception as e:
            code = _mlflow_code(e)
            if code in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"}:
                self._registered_model(adapter)
                raise AliasNotFoundError(f"adapter '{adapter}' has no alias '{alias}'") from e
            raise from_mlflow(e, f"adapter '{adapter}' alias '{alias}'") from e

    def _search_versions(self, adapter: str) -> list:
        out, token = [], None
        while True:
            page = self._call(
                f"adapter '{adapter}'",
                lambda token=token: self.client.search_model_versions(
                    f"name='{adapter}'", max_results=1000, page_token=token
                ),
            )
            out.extend(page)
            token = getattr(page, "token", None)
            if not token:
                return out

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
    ) -> VersionInfo:
        """Register a new immutable version built from local ``files`` (artifact name -> path)
        and ``manifest`` (written as manifest.json). Creates the adapter if absent. All or
        nothing: on any failure no run, version or new adapter is left behind and the live
        alias is unchanged. With ``set_live`` the new version becomes live; with
        ``parent_must_be_live`` only if ``parent`` (None: no version) is still the live version
        when it is about to move — read from the tracking store right before the alias moves, so
        that of two replicas editing one adapter at once the second raises ``StaleParentError``
        instead of making live a version that lacks the first one's edit."""
        check_adapter_name(adapter)
        staged = self._check_inputs(files, manifest, base_fingerprint, editor, num_edits, parent, description)
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
            }
            with self._lock:
                exp_id = self._experiment()
                created_model = self._ensure_adapter(adapter, base_fingerprint)
                run_id = mv = None
                try:
                    if parent is not None:
                        self._model_version(adapter, parent)
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

    def _check_inputs(
        self, files, manifest, base_fingerprint, editor, num_edits, parent, description
    ) -> dict[str, Path]:
        if not isinstance(files, dict) or not files:
            raise InvalidArgumentError("a version needs at least one file (a .safetensors edit set)")
        staged: dict[str, Path] = {}
        for name, path in files.items():
            if not isinstance(name, str) or not _FILE_RE.match(name) or name == MANIFEST:
                raise InvalidArgumentError(
                    f"invalid file name {name!r}: a plain name of letters, digits, '.', '-', '_' "
                    f"(and not {MANIFEST}, which is written from the manifest)"
                )
            if not name.lower().endswith(ALLOWED_SUFFIXES):
                raise InvalidArgumentError(f"file '{name}': only {', '.join(ALLOWED_SUFFIXES)} files are stored")
            p = Path(path)
            if not p.is_file():
                raise InvalidArgumentError(f"file '{name}' not found at {p}")
            staged[name] = p
        if not any(n.lower().endswith(".safetensors") for n in staged):
            raise InvalidArgumentError("a version needs at least one .safetensors edit set")
        if not isinstance(manifest, dict):
            raise InvalidArgumentError("the manifest must be a JSON object (dict)")
        try:
            json.dumps(manifest)
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"the manifest is not JSON-serialisable: {e}") from e
        for label, value in (("base_fingerprint", base_fingerprint), ("editor", editor)):
            if not isinstance(value, str) or not value.strip() or len(value) > 500:
                raise InvalidArgumentError(f"{label} must be a non-empty string")
        if isinstance(num_edits, bool) or not isinstance(num_edits, int) or num_edits < 0:
            raise InvalidArgumentError(f"num_edits must be a non-negative integer, not {num_edits!r}")
        if parent is not None:
            check_version_number(parent)
        if not isinstance(description, str):
            raise InvalidArgumentError("description must be a string")
        return staged

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

    def _delete_run(self, run_id: str) -> None:
        """Delete a run's artifacts and the run (best effort for the artifacts)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        c = self._client
        try:
            uri = c.get_run(run_id).info.artifact_uri
            get_artifact_repository(uri, tracking_uri=self.tracking_uri).delete_artifacts()
        except Exception as e:
            log.debug("could not delete the artifacts of run %s: %s", run_id, e)
        c.delete_run(run_id)

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

    def check_consistency(self, repair: bool = False, grace_seconds: float = 600.0) -> dict[str, Any]:
        """What a crash can leave, checked: every version's files verify against its checksums (downloaded
        as ``download`` does), every alias points at a verified version, and no run of the EditLens experiment
        is an orphan (artifacts logged by a registration that died before its version was made). Orphans
        older than ``grace_seconds`` (a younger one may be another replica's registration in flight) are
        deleted with ``repair``. Returns the findings: ``versions`` checked, ``bad_versions``,
        ``bad_aliases``, ``orphan_runs`` (found) and ``deleted_runs``."""
        out: dict[str, Any] = {
            "versions": 0,
            "bad_versions": [],
            "bad_aliases": [],
            "orphan_runs": [],
            "deleted_runs": [],
        }
        referenced: set[str] = set()
        for adapter in self.adapters():
            verified: set[int] = set()
            for mv in self._search_versions(adapter):
                if mv.run_id:
                    referenced.add(mv.run_id)
                out["versions"] += 1
                try:
                    self.clear_cache(adapter, int(mv.version))  # the store's copy, not a cached one, is checked
                    self.download(adapter, int(mv.version))
                    verified.add(int(mv.version))
                except RegistryError as e:
                    out["bad_versions"].append({"adapter": adapter, "version": int(mv.version), "error": str(e)})
            for alias, v in (self._registered_model(adapter).aliases or {}).items():
                if int(v) not in verified:
                    out["bad_aliases"].append({"adapter": adapter, "alias": alias, "version": int(v)})
        now_ms = time.time() * 1000
        from mlflow.entities import ViewType

        runs = self._call(
            "runs",
            lambda: self.client.search_runs(
                [self._experiment()], max_results=50_000, run_view_type=ViewType.ACTIVE_ONLY
            ),
        )
        for run in runs:
            if run.info.run_id in referenced:
                continue
            age = (now_ms - float(run.info.start_time or now_ms)) / 1000
            out["orphan_runs"].append({"run_id": run.info.run_id, "status": run.info.status, "age_s": round(age, 1)})
            if repair and age >= grace_seconds:
                self._delete_run(run.info.run_id)
                out["deleted_runs"].append(run.info.run_id)
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

    # -- files -----------------------------------------------------------------------------

    def clear_cache(self, adapter: str | None = None, version: int | None = None) -> None:
        """Remove downloaded copies (all, one adapter's, or one version's)."""
        target = self.cache_dir
        if adapter is not None:
            target = target / check_adapter_name(adapter)
            if version is not None:
                target = target / str(check_version_number(version))
        shutil.rmtree(target, ignore_errors=True)

    def _fetch(self, source: str, name: str, dst: Path, adapter: str, version: int, expected: str) -> Path:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        label = f"adapter '{adapter}' version {version}"
        try:
            repo = get_artifact_repository(source, tracking_uri=self.tracking_uri)
            local = Path(repo.download_artifacts(name, dst_path=str(dst)))
        except Exception as e:
            raise RegistryError(
                f"{label}: file '{name}' is missing or unreadable in the artifact store ({type(e).__name__})"
            ) from e
        if not local.is_file():
            raise RegistryError(f"{label}: file '{name}' is missing in the artifact store")
        got = sha256_file(local)
        if got != expected:
            raise RegistryError(
                f"{label}: file '{name}' is corrupted (sha256 {got[:12]}..., expected {expected[:12]}...)"
            )
        return local

    def verify_stored(self, adapter: str, version: int) -> None:
        """Fetch the version's files from the artifact store again and check each against its checksum, as a
        replica that never downloaded them would (the local cache is not consulted); RegistryError naming the
        first missing or corrupted file."""
        check_adapter_name(adapter)
        check_version_number(version)
        mv = self._model_version(adapter, version)
        sha = self._info(mv).sha256
        if not sha:
            raise RegistryError(f"adapter '{adapter}' version {version} has no recorded checksums")
        with tempfile.TemporaryDirectory(prefix="editlens-verify-") as tmp:
            for name in sorted(sha):
                self._fetch(mv.source, name, Path(tmp), adapter, version, sha[name])

    def _cached_ok(self, folder: Path, run_id: str, sha: dict[str, str]) -> bool:
        try:
            marker = json.loads((folder / _CACHE_MARKER).read_text())
        except (OSError, ValueError):
            return False
        if marker.get("run_id") != run_id or marker.get("sha256") != sha:
            return False
        return all((folder / n).is_file() and sha256_file(folder / n) == h for n, h in sha.items())

    def download(self, adapter: str, version: int) -> Path:
        """A local folder with the version's files, cached in ``<data_dir>/cache/<adapter>/<version>``.
        Every file's sha256 is checked against the registry (also for cached copies); a missing
        or corrupted file raises RegistryError naming it, and no partial folder is left."""
        check_adapter_name(adapter)
        check_version_number(version)
        mv = self._model_version(adapter, version)
        info = self._info(mv)
        sha = info.sha256
        if not sha:
            raise RegistryError(
                f"adapter '{adapter}' version {version} has no recorded checksums (not created by EditLens)"
            )
        final = self.cache_dir / adapter / str(version)
        with self._dl_guard:
            lock = self._dl_locks.setdefault((adapter, version), threading.Lock())
        with lock:
            if final.is_dir() and self._cached_ok(final, mv.run_id or "", sha):
                return final
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".tmp-{version}-{uuid.uuid4().hex}"
            try:
                tmp.mkdir()
                for name in sorted(sha):
                    self._fetch(mv.source, name, tmp, adapter, version, sha[name])
                for extra in tmp.iterdir():
                    if extra.name not in sha:
                        shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
                (tmp / _CACHE_MARKER).write_text(json.dumps({"run_id": mv.run_id or "", "sha256": sha}))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return final

    def _load_manifest(self, adapter: str, version: int, run_id: str, source: str, sha: dict[str, str]) -> dict:
        key = (adapter, version, run_id)
        if key in self._manifests:
            return self._manifests[key]
        expected = sha.get(MANIFEST)
        if expected is None:
            raise RegistryError(f"adapter '{adapter}' version {version} has no manifest checksum")
        cached = self.cache_dir / adapter / str(version) / MANIFEST
        if cached.is_file() and sha256_file(cached) == expected:
            text = cached.read_text(encoding="utf-8")
        else:
            with tempfile.TemporaryDirectory(prefix="editlens-manifest-") as tmp:
                text = self._fetch(source, MANIFEST, Path(tmp), adapter, version, expected).read_text(encoding="utf-8")
        manifest = json.loads(text)
        self._manifests[key] = manifest
        return manifest
