"""Registry errors: every failure of the registry surfaces as one of these, with a message a
user can read (never an MLflow traceback). The server maps them to gRPC status codes:
NotFoundError -> NOT_FOUND, ConflictError -> FAILED_PRECONDITION, InvalidArgumentError ->
INVALID_ARGUMENT, UnavailableError -> UNAVAILABLE, any other RegistryError -> INTERNAL.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class; ``str(err)`` is a message readable by a user."""


class NotFoundError(RegistryError):
    """An adapter, version or alias does not exist."""


class AliasNotFoundError(NotFoundError):
    """The adapter exists but has no such alias (e.g. no live version yet)."""


class UnavailableError(RegistryError):
    """The registry (an MLflow tracking server, its artifact store) cannot be reached."""


class ConflictError(RegistryError):
    """The request contradicts the registry's state (deleting the live version, nothing to
    roll back to, a name taken by a registered model that is not an adapter, a base-model
    fingerprint that differs from the adapter's)."""


class StaleParentError(ConflictError):
    """A new version was built on a live version that is no longer live (another replica made a version
    live in the meantime); nothing was registered. Retrying builds on the new live version."""


class InvalidArgumentError(RegistryError):
    """A malformed name, reference or argument."""


_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "ENDPOINT_NOT_FOUND"}
_CONFLICT = {
    "RESOURCE_ALREADY_EXISTS",
    "ALREADY_EXISTS",
    "RESOURCE_CONFLICT",
    "ABORTED",
    "INVALID_STATE",
    "FAILED_PRECONDITION",
}
_INVALID = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST"}


def _first_line(text: str, limit: int = 300) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def from_mlflow(exc: BaseException, what: str) -> RegistryError:
    """Translate an exception raised by MLflow (or by its HTTP/artifact layers) into a
    RegistryError. ``what`` names the object of the failed operation, e.g.
    "adapter 'foo' version 3"; it starts the message."""
    code = getattr(exc, "error_code", None)
    detail = _first_line(getattr(exc, "message", None) or str(exc)) or type(exc).__name__
    if code in _NOT_FOUND:
        return NotFoundError(f"{what} not found")
    if code in _CONFLICT:
        return ConflictError(f"{what}: {detail}")
    if code in _INVALID:
        return InvalidArgumentError(f"{what}: {detail}")
    name = type(exc).__name__
    unreachable = ("Max retries exceeded", "Failed to establish", "Connection refused", "timed out")
    if "Connection" in name or "Timeout" in name or any(u in detail for u in unreachable):
        return UnavailableError(f"{what}: cannot reach the MLflow tracking server ({detail})")
    if code:
        return RegistryError(f"{what}: MLflow error {code}: {detail}")
    return RegistryError(f"{what}: {name}: {detail}")
