"""Errors of the HTTP gateway's JSON API and the HTTP status of each broker error code.

An `ApiError` is an operating error of one request (bad input, unknown topic, offset out of
range): the gateway answers it with its status and a JSON body ``{"error": "..."}`` (plus
``"error_code"`` when a broker error code applies) and keeps serving.
"""

from __future__ import annotations

from typing import Any

from protocol import DwalError, ErrorCode

_NOT_FOUND = frozenset({ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, ErrorCode.OFFSET_OUT_OF_RANGE})
_TOO_LARGE = frozenset({ErrorCode.MESSAGE_TOO_LARGE, ErrorCode.RECORD_LIST_TOO_LARGE})
_BAD_REQUEST = frozenset({ErrorCode.POLICY_VIOLATION, ErrorCode.UNSUPPORTED_COMPRESSION_TYPE})
# Retriable codes mean "try again later" except a corrupt batch, which the gateway built itself.
_UNAVAILABLE = frozenset(code for code in ErrorCode if code.retriable) - {ErrorCode.CORRUPT_MESSAGE}


class ApiError(Exception):
    """A request answered with an HTTP error `status` and a clear `message`.

    `code` is the broker error code behind it, if any; `headers` are extra response headers
    (for example ``Allow`` on a 405).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: ErrorCode | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        assert 400 <= status <= 599, status
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        body: dict[str, Any] = {"error": self.message}
        if self.code is not None:
            body["error_code"] = self.code.name
        return body


def status_for_error_code(code: ErrorCode) -> int:
    """The HTTP status that answers a broker error `code` (never 2xx)."""
    if code in _NOT_FOUND:
        return 404
    if code in _TOO_LARGE:
        return 413
    if code.name.startswith("INVALID_") or code in _BAD_REQUEST:
        return 400
    if code == ErrorCode.TOPIC_ALREADY_EXISTS:
        return 409
    if code in _UNAVAILABLE:
        return 503
    return 500


def api_error_from(error: DwalError) -> ApiError:
    """Wrap a broker error into the ApiError that reports it over HTTP."""
    return ApiError(status_for_error_code(error.code), error.message, code=error.code)
