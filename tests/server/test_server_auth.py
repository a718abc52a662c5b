"""`--api-key` as SGLang and vLLM spell it (issue 15, point 6): one key guards every route
but /health* and /metrics, sent as `Authorization: Bearer <key>`; the admin token still
guards the weight and control routes (and opens every route); loopback-only without any
key stays the default."""

from __future__ import annotations

import argparse

import httpx
import openai
import pytest

from bebop_spec.server.cli import add_serve_args
from bebop_spec.server.config import ServerConfig
from bebop_spec.server.testing import serve_model

KEY, ADMIN = "k-123", "adm-456"
GEN = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, "ignore_eos": True}}
CMPL = {"prompt": [1, 2, 3], "max_tokens": 2}


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return p.parse_args(list(argv))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def both(tiny_model):
    with serve_model(
        str(tiny_model), str(tiny_model / "mtp"), server={"api_key": KEY, "admin_token": ADMIN}
    ) as (srv, st):
        yield srv, st


@pytest.fixture(scope="module")
def key_only(tiny_model):
    with serve_model(str(tiny_model), str(tiny_model / "mtp"), server={"api_key": KEY}) as (
        srv,
        st,
    ):
        yield srv, st


def test_api_key_guards_every_route_but_health_and_metrics(both):
    """Without the key: 401 on generation, info and tokenizer routes; /health, /health_generate
    and /metrics stay open (probes and scrapers send no key, as with SGLang)."""
    srv, _ = both
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for method, path, body in [("POST", "/generate", GEN), ("POST", "/v1/completions", CMPL),
                                   ("GET", "/v1/models", None), ("GET", "/get_model_info", None),
                                   ("GET", "/v1/loads", None), ("GET", "/is_paused", None)]:  # fmt: skip
            r = c.request(method, path, json=body)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
            assert c.request(method, path, json=body, headers=bearer("wrong")).status_code == 401
            assert c.request(method, path, json=body, headers=bearer(KEY)).status_code == 200, path
        for path in ("/health", "/health_generate", "/metrics"):
            assert c.get(path).status_code == 200, path
        assert KEY not in c.get("/get_server_info", headers=bearer(KEY)).text


def test_openai_client_with_api_key(both):
    """The official client sends its api_key as the bearer: it works with the key and raises
    AuthenticationError with any other."""
    srv, _ = both
    ok = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
    assert ok.completions.create(model="tiny", prompt=[1, 2], max_tokens=2).usage.completion_tokens
    bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_admin_token_still_guards_admin_routes(both):
    """With both keys, weight / control routes need the admin token (the API key is not
    enough); the admin token also opens the ordinary routes."""
    srv, _ = both
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for path in ("/flush_cache", "/reset_prefix_cache", "/resume"):
            assert c.post(path, headers=bearer(KEY)).status_code == 401, path
            assert c.post(path, headers=bearer(ADMIN)).status_code == 200, path
        body = {"abort_all": True}
        assert c.post("/abort_request", json=body, headers=bearer(KEY)).status_code == 401
        assert c.post("/abort_request", json=body, headers=bearer(ADMIN)).status_code == 200
        assert c.post("/generate", json=GEN, headers=bearer(ADMIN)).status_code == 200


def test_api_key_alone_guards_admin_routes(key_only):
    """Without an admin token the API key guards the admin routes like every other."""
    srv, _ = key_only
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.post("/flush_cache").status_code == 401
        assert c.post("/flush_cache", headers=bearer(KEY)).status_code == 200
        assert c.get("/get_server_info", headers=bearer(KEY)).json()["admin_protected"] is True


def test_bind_rules_and_cli(monkeypatch):
    """Loopback-only without a key stays the default; an API key (or an admin token) allows a
    public bind; --api-key falls back to $BEBOP_API_KEY."""
    with pytest.raises(ValueError, match="api key or admin token"):
        ServerConfig(host="0.0.0.0")
    assert ServerConfig(host="0.0.0.0", api_key="k").admin_protected
    assert ServerConfig(api_key="").api_key is None
    monkeypatch.setenv("BEBOP_API_KEY", "from-env")
    assert parse("--model", "/m").api_key == "from-env"
    assert parse("--model", "/m", "--api-key", "x").api_key == "x"
