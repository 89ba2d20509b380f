"""Errors of the OpenAI-compatible API: the body and status a client sees, and how an
exception from the router or a failed generation maps to one.
"""

from __future__ import annotations

import math

from adrenaline.errors import InvalidRequestError, OverloadedError, ServiceUnavailableError
from adrenaline.protocol import TokenDelta


class APIError(Exception):
    """An error the client sees as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}  # e.g. Retry-After on 429/503
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def overloaded(message: str, retry_after_s: float) -> APIError:
    """429 with Retry-After: the router refused the request at its admission limits."""
    return APIError(429, message, code="overloaded", type="rate_limit_error",
                    headers={"Retry-After": str(max(0, math.ceil(retry_after_s)))})


def _is_backpressure(exc: BaseException) -> bool:
    try:
        from ray.serve.exceptions import BackPressureError
    except ImportError:  # an older Serve
        return False
    return isinstance(exc, BackPressureError)


def router_error(exc: BaseException) -> APIError:
    """Map an exception raised through the router's handle to an APIError.

    Ray wraps a remote exception in a ``RayTaskError`` subclass of the original
    class whose ``cause`` is the original; a rejected request
    (``InvalidRequestError``) is the client's fault -> 400, anything else -> 500.
    """
    cause: BaseException = exc
    while isinstance(getattr(cause, "cause", None), BaseException) and cause.cause is not cause:
        cause = cause.cause  # type: ignore[attr-defined]
    if isinstance(cause, InvalidRequestError):
        return bad_request(str(cause))
    if isinstance(cause, OverloadedError):
        return overloaded(str(cause), cause.retry_after_s)
    if _is_backpressure(cause):  # Serve's own queue to the router is full (a backstop)
        return overloaded("the server is overloaded: its request queue is full; retry later",
                          1)
    if isinstance(cause, ServiceUnavailableError):
        return APIError(503, str(cause), code="unavailable", headers={"Retry-After": "5"})
    if isinstance(exc, InvalidRequestError):  # wrapped, cause lost: the traceback's last line
        last = (str(exc).strip().splitlines() or ["invalid request"])[-1]
        return bad_request(last.split("InvalidRequestError: ", 1)[-1])
    return APIError(500, f"internal error: {type(cause).__name__}: {cause}")


def finish_error(delta: TokenDelta) -> APIError | None:
    """The error a final delta stands for ("error" -> 500, "abort" -> 503), else None."""
    if delta.finish_reason == "error":
        return APIError(500, f"generation failed: {delta.error or 'unknown error'}")
    if delta.finish_reason == "abort":
        return APIError(503, "the request was aborted by the server", code="aborted")
    return None
