"""Every exception a request can raise, mapped to a gRPC status code in one place.

The client sees a status code and a readable message, never a traceback;
anything unexpected is logged here with its traceback and reaches the
client as INTERNAL with the exception's message. The server keeps running.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time

import grpc

log = logging.getLogger("editlens.server")


class ServiceError(Exception):
    """A request the server refuses, with the status code to answer."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServiceError:
    """An INVALID_ARGUMENT refusal."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServiceError:
    """A NOT_FOUND refusal."""
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def precondition(message: str) -> ServiceError:
    """A FAILED_PRECONDITION refusal."""
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message)


def exhausted(message: str) -> ServiceError:
    """A RESOURCE_EXHAUSTED refusal."""
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def aborted(message: str) -> ServiceError:
    """An ABORTED refusal: a concurrency conflict; retrying later succeeds."""
    return ServiceError(grpc.StatusCode.ABORTED, message)


def unavailable(message: str) -> ServiceError:
    """An UNAVAILABLE refusal."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


class JobCancelled(Exception):
    """The client went away (or cancelled) before the job finished; nothing was registered."""


class JobTimedOut(JobCancelled):
    """The job ran past the server's ``--max-job-seconds``; it was stopped and nothing was registered."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message to answer for ``exc``, by its type (never by its message)."""
    from diagnostics.errors import DiagnosticError
    from editors.files import EditSetError
    from registry.errors import (
        ConflictError,
        InvalidArgumentError,
        NotFoundError,
        RegistryError,
        StaleParentError,
        UnavailableError,
    )
    from vlm.errors import ModelLoadError, VLMError

    from .bundles import BundleError

    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, JobTimedOut):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, JobCancelled):
        return grpc.StatusCode.CANCELLED, str(exc) or "the job was cancelled"
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, StaleParentError):  # another replica made a version live first: retrying succeeds
        return grpc.StatusCode.ABORTED, str(exc)
    if isinstance(exc, ConflictError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, InvalidArgumentError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (EditSetError, BundleError)):  # FingerprintMismatchError, IncompatibleEditSetError too
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE, f"the registry is unavailable: {exc}"
    if isinstance(exc, RegistryError):
        return grpc.StatusCode.INTERNAL, f"registry error: {exc}"
    if isinstance(exc, ModelLoadError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, (DiagnosticError, VLMError)):  # ImageDecodeError, PromptError, ...
        label = getattr(exc, "case_label", None)
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc) if not label or label == "request" else f"{label}: {exc}"
    if isinstance(exc, ValueError):  # ConfigError (an editor's or the trainer's settings) and argument checks
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory for this request"
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {exc}"


def _abort(context, exc: BaseException, observed: list[str]):
    code, message = status_for(exc)
    if code != grpc.StatusCode.INTERNAL:
        log.info("%s: %s", code.name, message)
    observed[0] = code.name
    context.abort(code, message)


def _observe(servicer, method: str, code: str, t0: float) -> None:
    metrics = getattr(servicer, "metrics", None)
    if metrics is not None:
        metrics.observe(method, code, time.perf_counter() - t0)


def rpc(method):
    """Wrap a servicer method (unary or a generator) so that every exception becomes a status; with metrics on
    (``servicer.metrics``), each call is counted by its status code and timed."""
    name = method.__name__
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):
            t0, code = time.perf_counter(), ["CANCELLED"]  # a stream its client dropped ends at a yield
            try:
                yield from method(self, request, context)
                code[0] = "OK"
            except Exception as exc:  # every error becomes a status; the server keeps serving
                _abort(context, exc, code)
            finally:
                _observe(self, name, code[0], t0)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        t0, code = time.perf_counter(), ["OK"]
        try:
            return method(self, request, context)
        except Exception as exc:  # every error becomes a status; the server keeps serving
            _abort(context, exc, code)
        finally:
            _observe(self, name, code[0], t0)

    return unary
