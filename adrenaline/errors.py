"""Typed exceptions of the public API."""

from __future__ import annotations

from adrenaline.config import ConfigError


class InvalidRequestError(ValueError):
    """A request (prompt or sampling parameters) is invalid; the message names the problem."""


class OverloadedError(RuntimeError):
    """The server is at its admission limits; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # crosses Ray processes with its retry hint
        return (OverloadedError, (str(self), self.retry_after_s))


class ServiceUnavailableError(RuntimeError):
    """A request could not be served because a worker failed and none could replace it."""


__all__ = ["ConfigError", "InvalidRequestError", "OverloadedError", "ServiceUnavailableError"]
