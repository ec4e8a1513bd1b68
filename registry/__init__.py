"""MLflow-backed adapter versions, aliases and rollback.

``Registry`` keeps versioned edit sets ("adapters") in the MLflow Model Registry; see
``registry/store.py`` for the layout. Importing this package does not import MLflow (a
Registry's constructor does), so the CLI stays fast.
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
from .store import (
    LIVE,
    MLFLOW_ENVIRONMENT,
    Registry,
    check_adapter_name,
    copy_database,
    default_data_dir,
    parse_ref,
    quiet_mlflow,
)
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
