"""Bearer-token authorization of the calls that change the registry, and who made them (for the audit)."""

from __future__ import annotations

import hmac

import grpc

from .errors import ServiceError


def check_token(token: str | None, context) -> None:
    """Raise UNAUTHENTICATED / PERMISSION_DENIED unless the call carries ``authorization: Bearer <token>``
    (nothing to check when the server has no token)."""
    if not token:
        return
    given = next((v for k, v in context.invocation_metadata() or () if k.lower() == "authorization"), None)
    if not given:
        raise ServiceError(
            grpc.StatusCode.UNAUTHENTICATED,
            "this call changes the registry and needs a token: send the metadata "
            "'authorization: Bearer <token>' (SDK: token=..., CLI: --token or EDITLENS_TOKEN)",
        )
    scheme, _, value = given.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "the authorization metadata must read 'Bearer <token>'")
    if not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, "the token is not valid for this server")


def token_valid(token: str | None, context) -> bool:
    """Whether the call may see what only token holders see (the audit trail): always on a server without a
    token, else only with the right one."""
    try:
        check_token(token, context)
    except ServiceError:
        return False
    return True


def caller(context, token_checked: bool) -> dict[str, str]:
    """Who made a call, for the audit trail: the peer address, the TLS client certificate's common name
    when the client presented one (mutual TLS), whether a valid token came with it (never the token), and
    the UTC time."""
    import datetime

    out = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "peer": context.peer() or "",
        "token": "valid" if token_checked else "none required",
    }
    try:
        auth = context.auth_context() or {}
    except Exception:  # a context without TLS
        auth = {}
    names = auth.get("x509_common_name") or []
    if names:
        out["client_certificate"] = names[0].decode() if isinstance(names[0], bytes) else str(names[0])
    return out
