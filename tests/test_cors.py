"""CORS: the policy as plain calls, what a browser's preflight and requests get, and config errors."""

from __future__ import annotations

from typing import Any

import pytest

from olla.admission_config import CorsConfig
from olla.config import parse_config
from olla.cors import CorsPolicy, is_preflight
from olla.errors import ConfigError
from tests.routerkit import chat, ep, fast, post

APP = "https://chat.example.com"
KEY = "sk-browser-0123456789"
PREFLIGHT = {"Origin": APP, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip


def cors_config(**cors: Any) -> CorsConfig:
    return parse_config({"server": {"cors": cors}}, "test.yaml", {}).server.cors


# ---- the policy -------------------------------------------------------------------------------


def test_defaults() -> None:
    assert cors_config() == CorsConfig(False, ("*",), ("GET", "POST", "OPTIONS"), ("*",), (), False, 300)


def test_every_cors_key_is_parsed() -> None:
    config = cors_config(enabled=True, allowed_origins=["https://Chat.Example.com", "http://localhost:3000"],
                         allowed_methods=["get", "POST"], allowed_headers=["Authorization", "Content-Type"],
                         exposed_headers=["X-Custom"], allow_credentials=True, max_age="10m")  # fmt: skip
    assert config == CorsConfig(True, ("https://chat.example.com", "http://localhost:3000"), ("GET", "POST"),
                                ("Authorization", "Content-Type"), ("X-Custom",), True, 600)  # fmt: skip


def test_preflight_detection() -> None:
    assert is_preflight("OPTIONS", PREFLIGHT)
    assert not is_preflight("OPTIONS", {"Origin": APP})
    assert not is_preflight("POST", PREFLIGHT)


def test_any_origin_policy() -> None:
    policy = CorsPolicy(CorsConfig(enabled=True))
    assert policy.preflight(APP, "authorization, content-type") == {
        "Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": "authorization, content-type", "Access-Control-Max-Age": "300"}
    assert not policy.varies
    headers = policy.response(APP, ["Content-Type", "X-Olla-Endpoint", "X-Olla-Request-Id", "Retry-After"])
    assert headers == {"Access-Control-Allow-Origin": "*",
                       "Access-Control-Expose-Headers": "X-Olla-Endpoint, X-Olla-Request-Id, Retry-After"}
    assert policy.response(None, []) == {} and policy.preflight("", None) == {}


def test_listed_origins_with_credentials() -> None:
    config = CorsConfig(True, (APP,), ("POST",), ("Authorization",), ("X-Custom",), True, 60)
    policy = CorsPolicy(config)
    assert policy.varies
    assert policy.preflight("https://CHAT.example.com", "x-other") == {
        "Access-Control-Allow-Origin": "https://CHAT.example.com", "Access-Control-Allow-Credentials": "true",
        "Access-Control-Allow-Methods": "POST", "Access-Control-Allow-Headers": "Authorization",
        "Access-Control-Max-Age": "60"}
    assert policy.preflight("https://evil.example", None) == {}
    assert policy.response("https://evil.example", ["X-Olla-Model"]) == {}
    assert policy.response(APP, ["X-Olla-Model", "X-RateLimit-Limit"]) == {
        "Access-Control-Allow-Origin": APP, "Access-Control-Allow-Credentials": "true",
        "Access-Control-Expose-Headers": "X-Custom, X-Olla-Model, X-RateLimit-Limit"}


@pytest.mark.parametrize(
    ("cors", "fragment"),
    [
        ({"allowed_origins": ["*"], "allow_credentials": True},
         "server.cors.allow_credentials: credentials cannot be allowed for any origin ('*'): got True"),
        ({"allow_credentials": True}, "server.cors.allow_credentials: credentials cannot be allowed for any origin"),
        ({"allowed_origins": ["*", APP]}, "server.cors.allowed_origins: '*' with other origins"),
        ({"allowed_origins": ["https://chat.example.com/app"]}, "server.cors.allowed_origins[0]: not an origin"),
        ({"allowed_origins": ["chat.example.com"]}, "allowed_origins[0]: not an origin: got 'chat.example.com'"),
        ({"allowed_origins": ["https://x.example:0"]}, "allowed_origins[0]: not an origin"),
        ({"allowed_origins": []}, "server.cors.allowed_origins: missing or empty"),
        ({"allowed_origins": APP}, "server.cors.allowed_origins: wrong type"),
        ({"allowed_methods": ["PO ST"]}, "server.cors.allowed_methods[0]: not an HTTP method"),
        ({"allowed_headers": ["Bad Header"]}, "server.cors.allowed_headers[0]: not a header name"),
        ({"exposed_headers": ["X Custom"]}, "server.cors.exposed_headers[0]: not a header name"),
        ({"max_age": -1}, "server.cors.max_age: negative duration"),
        ({"enabled": "yes"}, "server.cors.enabled: wrong type"),
        ({"allowed_origin": [APP]}, "server.cors.allowed_origin: unknown key (did you mean allowed_origins?)"),
    ],
)
def test_bad_cors_config(cors: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": {"cors": cors}}, "test.yaml", {})
    (problem,) = caught.value.problems
    assert fragment in problem, problem


# ---- the router -------------------------------------------------------------------------------


async def test_preflight_is_answered_without_a_key_or_a_token(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server={
        "auth": {"api_keys": [{"key": KEY, "client": "browser"}]},
        "rate_limits": {"per_ip_requests_per_minute": 1, "burst_size": 1},
        "cors": {"enabled": True, "allowed_origins": [APP], "allow_credentials": True, "max_age": 600}})  # fmt: skip
    for _ in range(3):
        r = await client.options("/olla/llamacpp/v1/chat/completions", headers=PREFLIGHT)
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == APP and r.headers["Vary"] == "Origin"
        assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
        assert r.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        assert r.headers["Access-Control-Allow-Credentials"] == "true" and r.headers["Access-Control-Max-Age"] == "600"
        assert "X-Olla-Request-Id" in r.headers
    ok = await post(client, chat(), headers={"Origin": APP, "Authorization": f"Bearer {KEY}"})
    assert ok.status == 200
    assert ok.headers["Access-Control-Allow-Origin"] == APP and ok.headers["Access-Control-Allow-Credentials"] == "true"
    exposed = {h.strip() for h in ok.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"X-Olla-Endpoint", "X-Olla-Request-Id", "X-Olla-Model", "X-RateLimit-Limit"} <= exposed
    assert "Origin" in ok.headers.getall("Vary")
    evil = {**PREFLIGHT, "Origin": "https://evil.example"}
    denied = await client.options("/olla/llamacpp/v1/chat/completions", headers=evil)
    assert denied.status == 204 and "Access-Control-Allow-Origin" not in denied.headers


async def test_errors_carry_cors_headers_so_a_browser_can_read_them(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server={
        "auth": {"api_keys": [{"key": KEY, "client": "browser"}]}, "cors": {"enabled": True}})  # fmt: skip
    r = await post(client, chat(), headers={"Origin": APP})
    assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == "*"
    assert "X-Olla-Request-Id" in r.headers["Access-Control-Expose-Headers"]


async def test_an_endpoints_cors_headers_never_reach_a_client(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())  # like llama-server, the emulator echoes any Origin
    evil = {"Origin": "https://evil.example"}
    off = await make_router([ep("a", a)])
    r = await post(off, chat(), headers=evil)
    assert r.status == 200 and not [h for h in r.headers if h.lower().startswith("access-control-")]
    assert (await off.options("/olla/llamacpp/v1/chat/completions", headers={**PREFLIGHT, **evil})).status == 405
    listed = await make_router([ep("a", a)], server={"cors": {"enabled": True, "allowed_origins": [APP]}})
    r = await post(listed, chat(), headers=evil)
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    r = await post(listed, chat(), headers={"Origin": APP})
    assert r.headers.getall("Access-Control-Allow-Origin") == [APP]
