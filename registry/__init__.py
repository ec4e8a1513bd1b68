"""MLflow-backed adapter versions, aliases and rollback.

``Registry`` keeps versioned edit sets ("adapters") in the MLflow Model Registry; see
``registry/store.py`` for the layout and for which module beside it holds what. Importing this package
does not import MLflow (a Registry's constructor does), so the CLI stays fast.
"""

from .errors import (
    AliasNotFoundError,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    RegistryError,
    StaleParentError,
    UnavailableError,
)
from .mlflow_env import MLFLOW_ENVIRONMENT, copy_database, default_data_dir, quiet_mlflow
from .names import LIVE, check_adapter_name, parse_ref
from .store import Registry
from .version_info import VersionInfo

__all__ = [
    "LIVE",
    "MLFLOW_ENVIRONMENT",
    "quiet_mlflow",
    "AliasNotFoundError",
    "UnavailableError",
    "ConflictError",
    "StaleParentError",
    "InvalidArgumentError",
    "NotFoundError",
    "Registry",
    "RegistryError",
    "VersionInfo",
    "check_adapter_name",
    "copy_database",
    "default_data_dir",
    "parse_ref",
]
