"""The MLflow environment: where the embedded registry lives, how MLflow is imported and quieted, and the
plumbing every registry call goes through.

``default_data_dir`` and the sqlite helpers (WAL journaling, consistent copies of a database), the
environment an EditLens process sets before importing MLflow (``MLFLOW_ENVIRONMENT``, ``quiet_mlflow``),
the one import of MLflow (``_import_mlflow``), and ``MlflowPlumbing``: the ``Registry`` methods that reach
the tracking store and translate its failures into ``RegistryError``s (the client, the experiment, one
registered model, one version by number or alias, an adapter's versions). Kept apart from ``store.py`` so
that the lifecycle there reads as what it does, not as how MLflow is called. MLflow is imported only by
``_import_mlflow`` (a Registry's constructor calls it), never when this module is imported.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import AliasNotFoundError, NotFoundError, RegistryError, from_mlflow
from .names import EXPERIMENT_NAME, TAG_KIND

log = logging.getLogger(__name__)

DB_NAME = "mlflow.db"


def editlens_home() -> Path:
    """$EDITLENS_HOME, default ~/.cache/editlens: the rule of ``vlm/home.py``, restated here only because the
    registry imports nothing of the model stack (tests/test_world_folder.py holds the two to the same answer).
    The server and the CLI resolve the registry's folder with ``vlm.home.registry_dir`` and pass it in; this
    default serves a ``Registry`` made without a ``data_dir``."""
    return Path(os.environ.get("EDITLENS_HOME") or Path.home() / ".cache" / "editlens").expanduser()


def default_data_dir() -> Path:
    """The embedded registry's folder: ``$EDITLENS_HOME/registry``."""
    return editlens_home() / "registry"


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


class MlflowPlumbing:
    """The MLflow side of ``Registry`` (a mixin): its constructor sets ``_client``, ``_init_lock``, ``_ready``,
    ``_lock``, ``_experiment_id``, ``artifact_location`` and ``embedded``, which these methods use."""

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
