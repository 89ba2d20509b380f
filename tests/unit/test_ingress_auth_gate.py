"""API keys (serve/auth.py) and the ingress's 429 gate (serve/gate.py), without Ray."""

from __future__ import annotations

import pytest

from adrenaline.app_config import LimitsConfig
from adrenaline.serve.auth import APIKeys
from adrenaline.serve.gate import IngressGate
from adrenaline.serve.openai_api.errors import APIError


def _status(keys: APIKeys, header: str | None) -> int:
    try:
        keys.check(header)
    except APIError as e:
        assert e.body()["error"]["code"] == "invalid_api_key"
        assert "sk-" not in e.message  # no key, presented or configured, in the answer
        return e.status
    return 200


def test_api_keys_from_config_and_env():
    keys = APIKeys(["sk-a"], env=" sk-b , ,sk-c")
    assert keys.enabled
    for good in ("Bearer sk-a", "Bearer sk-b", "bearer sk-c", "Bearer  sk-a "):
        assert _status(keys, good) == 200, good
    for bad in (None, "", "Bearer", "Bearer ", "Basic sk-a", "sk-a", "Bearer sk-", "Bearer sk-ab",
                "Bearer sk-a,sk-b", "Bearer \udcff"):
        assert _status(keys, bad) == 401, bad


def test_no_keys_means_open(monkeypatch):
    monkeypatch.delenv("ADRENALINE_API_KEYS", raising=False)
    keys = APIKeys([])
    assert not keys.enabled and _status(keys, None) == 200
    monkeypatch.setenv("ADRENALINE_API_KEYS", "sk-env")
    keys = APIKeys([])
    assert _status(keys, None) == 401 and _status(keys, "Bearer sk-env") == 200


def test_gate_refuses_beyond_the_limit_with_retry_after():
    gate = IngressGate(LimitsConfig(max_ongoing_requests=2, retry_after_s=3))
    a, b = gate.enter(), gate.enter()
    with pytest.raises(APIError) as e:
        gate.enter()
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "3"
    assert e.value.body()["error"]["type"] == "rate_limit_error"
    a.release()
    a.release()  # idempotent: the count never goes below what is held
    assert gate.num_held == 1 and gate.num_refused == 1
    c = gate.enter()
    b.release(), c.release()
    assert gate.num_held == 0
