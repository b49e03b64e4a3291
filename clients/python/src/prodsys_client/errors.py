"""What a refused or failed call raises: gRPC statuses as Python exceptions."""

from __future__ import annotations

from typing import NamedTuple

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class Violation(NamedTuple):
    """One reason a request was refused: the field (``parameters.zenith_deg``,
    ``profile``, …) and why."""

    field: str
    reason: str


class ProdsysError(Exception):
    """A call prodsys answered with an error (or that could not reach it)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        if self.code is None:
            return self.message
        return f"{self.code.name}: {self.message}"


class InvalidRequest(ProdsysError):
    """INVALID_ARGUMENT: the request was refused at once, field by field
    (the ``google.rpc.BadRequest`` details of the gRPC status)."""

    def __init__(self, message: str, violations: list[Violation]):
        super().__init__(message, grpc.StatusCode.INVALID_ARGUMENT)
        self.violations = violations

    def __str__(self) -> str:
        lines = [f"{v.field}: {v.reason}" for v in self.violations]
        return "\n  ".join(["the request was refused", *lines])


class NotFound(ProdsysError):
    """NOT_FOUND: no such request or production (or not yet known to the service asked)."""


class Conflict(ProdsysError):
    """ALREADY_EXISTS: e.g. an idempotency key reused for a different request."""


class Timeout(ProdsysError, TimeoutError):
    """A wait or a call outlived its deadline."""


def from_rpc_error(error: grpc.RpcError) -> ProdsysError:
    """The exception for a failed call, with field violations decoded."""
    code = error.code() if hasattr(error, "code") else None
    message = (error.details() if hasattr(error, "details") else None) or str(error)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = field_violations(error)
        if violations:
            return InvalidRequest(message, violations)
    kind = {
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.ALREADY_EXISTS: Conflict,
        grpc.StatusCode.DEADLINE_EXCEEDED: Timeout,
    }.get(code, ProdsysError)
    return kind(message, code)


def field_violations(error: grpc.RpcError) -> list[Violation]:
    """The ``google.rpc.BadRequest`` field violations a status carries, if any."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        # The rich status does not match the call's code and message.
        return []
    if status is None:
        return []
    violations = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [Violation(v.field, v.description) for v in bad.field_violations]
    return violations
