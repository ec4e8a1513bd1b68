"""The EditLens service's method handlers, with requests that cannot be decoded answered INVALID_ARGUMENT.

grpcio's generated ``add_EditLensServicer_to_server`` parses each request with the message's ``FromString``;
a request protobuf refuses (a string field that is not UTF-8, truncated bytes) then fails inside gRPC with
INTERNAL and a traceback in the log, before any EditLens code runs. These handlers are the same methods,
built from the contract's service descriptor, whose parser hands such a request to the method as an
``Undecodable`` and answers it INVALID_ARGUMENT with protobuf's reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from editlens.v1 import editlens_pb2 as pb
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not a valid message of its type."""

    message: str
    reason: str


def _parser(cls) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, UnicodeDecodeError) as exc:
            return Undecodable(cls.__name__, str(exc) or type(exc).__name__)

    return parse


def _refusing(method, streaming: bool):
    def refuse(request: Undecodable, context):
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid {request.message} ({request.reason}); every string field must be UTF-8",
        )

    if streaming:

        def stream(request, context):
            if isinstance(request, Undecodable):
                refuse(request, context)
            yield from method(request, context)

        return stream

    def unary(request, context):
        if isinstance(request, Undecodable):
            refuse(request, context)
        return method(request, context)

    return unary


def service_handler(servicer) -> grpc.GenericRpcHandler:
    """The generic handler of every method of ``editlens.v1.EditLens`` on ``servicer``."""
    service = pb.DESCRIPTOR.services_by_name["EditLens"]
    handlers = {}
    for m in service.methods:
        request, response = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(
            _refusing(getattr(servicer, m.name), m.server_streaming),
            request_deserializer=_parser(request),
            response_serializer=response.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
