"""API keys at the ingress: ``Authorization: Bearer <key>``, as OpenAI-compatible servers do.

Keys come from the app's ``api_keys`` (YAML) plus the comma-separated environment
variable ``ADRENALINE_API_KEYS`` of the ingress's process; no key configured means the
API is open. Invariants: a presented key is compared with every configured key in
constant time (``hmac.compare_digest`` over SHA-256 digests, so neither the content nor
the length of a key leaks through timing, and there is no early exit); a key is never
logged or put in an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from adrenaline.serve.openai_api.errors import APIError

ENV_VAR = "ADRENALINE_API_KEYS"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", type="invalid_request_error",
                    headers={"WWW-Authenticate": "Bearer"})


class APIKeys:
    def __init__(self, keys: list[str] | tuple[str, ...] = (), env: str | None = None):
        env = os.environ.get(ENV_VAR, "") if env is None else env
        all_keys = [k for k in keys if k] + [k.strip() for k in env.split(",") if k.strip()]
        self._digests = [_digest(k) for k in all_keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise a 401 APIError unless ``authorization`` is "Bearer <a configured key>"."""
        if not self._digests:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("missing API key: send the header 'Authorization: Bearer "
                               "<key>'")
        given = _digest(token.strip())
        ok = False
        for d in self._digests:  # every key, no short cut
            ok |= hmac.compare_digest(given, d)
        if not ok:
            raise unauthorized("incorrect API key provided")
