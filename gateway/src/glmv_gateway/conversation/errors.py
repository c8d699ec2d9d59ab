"""Domain errors of a turn: a kind, whether retrying can help, and the component that failed.

``STATUS`` gives each kind's HTTP-equivalent status; transports use it (the HTTP API answers with
it, event streams carry it in ``error`` events).
"""

from __future__ import annotations

import grpc

from glmv_gateway.clients import ComponentError
from glmv_gateway.conversation.events import ErrorEvent

STATUS: dict[str, int] = {
    "invalid_request": 400,
    "not_found": 404,
    "busy": 409,
    "too_large": 413,
    "no_speech": 422,
    "rate_limited": 429,
    "upstream": 502,
    "unavailable": 503,
    "timeout": 504,
}
RETRYABLE = {"busy", "rate_limited", "unavailable", "timeout"}

_GRPC_KIND = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_request",
    grpc.StatusCode.FAILED_PRECONDITION: "invalid_request",
    grpc.StatusCode.OUT_OF_RANGE: "invalid_request",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limited",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
}


def kind_of(error: ComponentError) -> str:
    return _GRPC_KIND.get(error.code, "upstream")


class TurnRejected(Exception):
    """The turn cannot start (nothing was generated, nothing stored)."""

    def __init__(
        self, kind: str, message: str, component: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.kind, self.message, self.component, self.code = kind, message, component, code

    @property
    def status(self) -> int:
        return STATUS[self.kind]

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    @classmethod
    def from_component(cls, error: ComponentError, what: str | None = None) -> TurnRejected:
        return cls(
            kind_of(error), f"{what or error.component}: {error.message}", error.component, error.code.name
        )

    def event(self, turn_id: str | None = None) -> ErrorEvent:
        return error_event(self.kind, self.message, self.component, self.code, turn_id)


def error_event(
    kind: str, message: str, component: str | None = None, code: str | None = None, turn_id: str | None = None
) -> ErrorEvent:
    return ErrorEvent(
        status=STATUS.get(kind, 500),
        message=message,
        kind=kind,
        component=component,
        code=code,
        retryable=kind in RETRYABLE,
        turn_id=turn_id,
    )


def component_error_event(error: ComponentError, turn_id: str | None = None) -> ErrorEvent:
    return error_event(kind_of(error), error.message, error.component, error.code.name, turn_id)
