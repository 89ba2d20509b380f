"""Typed exceptions of the public API."""

from __future__ import annotations

from adrenaline.config import ConfigError


class InvalidRequestError(ValueError):
    """A request (prompt or sampling parameters) is invalid; the message names the problem."""


__all__ = ["ConfigError", "InvalidRequestError"]
