"""Inbound auth: where keys come from, how they are checked, and what a client sees with and without one."""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from olla import clients as clients_module
from olla.admission_config import AuthConfig
from olla.clients import Clients, generated_client, parse_key_list, presented_key
from olla.config import parse_config
from olla.errors import ConfigError
from tests.routerkit import CHAT, chat, ep, fake_endpoint, fast, post

KEY_A, KEY_B = "sk-team-a-0123456789", "sk-team-b-9876543210"
MISSING = "Missing API key: send it as 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'."
AUTH = {"auth": {"api_keys": [{"key": KEY_A, "client": "team-a"}, {"key": KEY_B, "client": "team-b"}]}}


def auth_config(auth: dict[str, Any], env: dict[str, str] | None = None, base_dir: Path | None = None) -> AuthConfig:
    return parse_config({"server": {"auth": auth}}, "test.yaml", env or {}, base_dir=base_dir).server.auth


def auth_problems(auth: Any, env: dict[str, str] | None = None, base_dir: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": {"auth": auth}}, "test.yaml", env or {}, base_dir=base_dir)
    return caught.value.problems


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---- where keys come from -------------------------------------------------------------------


def test_keys_from_the_config_file() -> None:
    auth = auth_config(AUTH["auth"])
    assert [(k.client, k.key) for k in auth.api_keys] == [("team-a", KEY_A), ("team-b", KEY_B)]
    assert auth.enabled and auth.protect_status


def test_no_keys_means_auth_is_off() -> None:
    auth = parse_config({}, "test.yaml", {}).server.auth
    assert auth.api_keys == () and not auth.enabled


def test_key_from_an_environment_variable() -> None:
    auth = auth_config({"api_keys": [{"key": "${TEAM_KEY}", "client": "team"}]}, {"TEAM_KEY": "from-env"})
    assert [(k.client, k.key) for k in auth.api_keys] == [("team", "from-env")]


def test_key_from_a_key_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "team.key").write_text("from-file\n")
    auth = auth_config({"api_keys": [{"key_file": "secrets/team.key", "client": "team"}]}, base_dir=tmp_path)
    assert [(k.client, k.key) for k in auth.api_keys] == [("team", "from-file")]


def test_openai_api_keys_variable_with_and_without_client_ids() -> None:
    env = {"OPENAI_API_KEYS": "key_a:team_a,key_b:team_b,key_c"}
    auth = auth_config({}, env)
    assert [(k.client, k.key) for k in auth.api_keys] == [
        ("team_a", "key_a"), ("team_b", "key_b"), (generated_client("key_c"), "key_c")]
    assert generated_client("key_c") == "client-" + hashlib.sha256(b"key_c").hexdigest()[:8]


def test_openai_api_keys_add_to_configured_keys() -> None:
    auth = auth_config(AUTH["auth"], {"OPENAI_API_KEYS": " key_x : team_x , "})
    assert [k.client for k in auth.api_keys] == ["team-a", "team-b", "team_x"]


def test_generated_client_ids_are_stable_and_never_the_key() -> None:
    assert generated_client("key_c") == generated_client("key_c") != generated_client("key_d")
    assert "key_c" not in generated_client("key_c") and len(generated_client("key_c")) == len("client-") + 8
    config_key = auth_config({"api_keys": [{"key": "key_c"}]}).api_keys[0]
    assert config_key.client == generated_client("key_c")


def test_parse_key_list() -> None:
    assert parse_key_list("a:x, b ,,c:") == [("a", "x"), ("b", None), ("c", None)]
    assert parse_key_list("") == []


def test_keys_never_appear_in_repr() -> None:
    config = parse_config({"server": AUTH}, "test.yaml", {})
    assert KEY_A not in repr(config) and KEY_B not in repr(config) and "team-a" in repr(config)


@pytest.mark.parametrize(
    ("auth", "env", "fragment"),
    [
        ({"api_keys": [{"client": "x"}]}, {}, "api_keys[0]: give exactly one of key and key_file: got neither"),
        ({"api_keys": [{"key": "k", "key_file": "f", "client": "x"}]}, {}, "exactly one of key and key_file: got both"),
        ({"api_keys": [{"key": "has space", "client": "x"}]}, {}, "server.auth.api_keys[0].key: empty, or contains"),
        ({"api_keys": [{"key": "k", "client": "anonymous"}]}, {}, "client: reserved for requests without a client"),
        ({"api_keys": [{"key": "k", "client": "two words"}]}, {}, "client: bad client id: got 'two words'"),
        ({"api_keys": [{"key": "k1"}, {"key": "k1", "client": "y"}]}, {},
         "server.auth.api_keys[1]: duplicate key (also at server.auth.api_keys[0]): got <redacted>"),
        ({"api_keys": [{"key": "${NOPE}"}]}, {}, "environment variable NOPE is not set: got <redacted>"),
        ({"api_keys": "k1"}, {}, "server.auth.api_keys: wrong type: got <redacted>"),
        ({"api_keys": ["k1"]}, {}, "server.auth.api_keys[0]: wrong type: got <redacted>"),
        ({"protect_status": "yes"}, {}, "server.auth.protect_status: wrong type"),
        ({"api_keys": [{"key": "k1"}]}, {"OPENAI_API_KEYS": "k1:dup"},
         "$OPENAI_API_KEYS[0]: duplicate key (also at server.auth.api_keys[0]): got <redacted>"),
        ({}, {"OPENAI_API_KEYS": "ok:fine,:nokey"}, "$OPENAI_API_KEYS[1]: empty, or contains"),
        ({}, {"OPENAI_API_KEYS": "k:bad client"}, "$OPENAI_API_KEYS[0]: bad client id: got 'bad client'"),
    ],
)
def test_bad_keys_are_named_but_never_shown(auth: Any, env: dict[str, str], fragment: str) -> None:
    found = auth_problems(auth, env)
    assert len(found) == 1 and fragment in found[0], found
    for secret in ("k1", "has space", "${NOPE}", "nokey"):
        assert f"'{secret}'" not in found[0]


def test_unreadable_or_empty_key_file(tmp_path: Path) -> None:
    (tmp_path / "empty.key").write_text("\n")
    found = auth_problems({"api_keys": [{"key_file": "missing.key"}, {"key_file": "empty.key"}]}, base_dir=tmp_path)
    assert "api_keys[0].key_file: cannot read key file: No such file or directory" in found[0]
    assert str(tmp_path / "missing.key") in found[0]
    assert "api_keys[1].key_file: bad key in file: empty" in found[1]


# ---- checking a key, as plain function calls ------------------------------------------------


def test_presented_key_from_bearer_or_x_api_key() -> None:
    assert presented_key({"Authorization": "Bearer abc"}) == "abc"
    assert presented_key({"Authorization": "bearer  abc "}) == "abc"
    assert presented_key({"X-Api-Key": "xyz"}) == "xyz"
    assert presented_key({"Authorization": "Bearer abc", "X-Api-Key": "xyz"}) == "abc"
    assert presented_key({"Authorization": "Basic dXNlcjpwYXNz", "X-Api-Key": "xyz"}) == "xyz"
    assert presented_key({"Authorization": "Bearer "}) is None and presented_key({}) is None


def test_lookup_finds_the_client_of_a_key() -> None:
    table = Clients([(KEY_A, "team-a"), (KEY_B, "team-b"), ("rotated", "team-a")])
    assert table.lookup(KEY_A) == "team-a" and table.lookup("rotated") == "team-a"
    assert table.lookup(KEY_B) == "team-b"
    assert table.lookup("sk-team-a") is None and table.lookup(KEY_A + "x") is None and table.lookup("") is None
    assert table.names == {"team-a", "team-b"} and len(table) == 3 and not Clients([])


def test_lookup_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(clients_module.hmac, "compare_digest", counting)
    table = Clients([(f"key-{i}", f"c{i}") for i in range(5)])
    for key in ("key-0", "key-4", "nobody"):
        calls.clear()
        table.lookup(key)
        assert len(calls) == 5, key  # no early exit on a match
        assert {len(a) for a, b in calls} == {len(b) for a, b in calls} == {32}  # digests, not raw keys


# ---- the router with keys -------------------------------------------------------------------


async def test_bearer_and_x_api_key_are_accepted(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server=AUTH)
    assert (await post(client, chat(), headers=bearer(KEY_A))).status == 200
    assert (await post(client, chat(), headers={"X-Api-Key": KEY_B})).status == 200
    models = await client.get("/olla/llamacpp/v1/models", headers=bearer(KEY_A))
    assert models.status == 200 and (await models.json())["data"][0]["id"] == CHAT


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, MISSING),
        ({"Authorization": "Bearer wrong-key"}, "Incorrect API key provided."),
        ({"X-Api-Key": KEY_A[:-1]}, "Incorrect API key provided."),
        ({"Authorization": f"Basic {KEY_A}"}, MISSING),
    ],
)
async def test_missing_or_wrong_key_is_401_in_openai_shape(start_sims, make_router, headers, message) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server=AUTH)
    r = await post(client, chat(), headers={**headers, "X-Request-Id": "req-401"})
    assert r.status == 401
    assert await r.json() == {"error": {"message": message, "type": "authentication_error", "code": "invalid_api_key"}}
    assert r.headers["X-Olla-Request-Id"] == "req-401" and r.headers["WWW-Authenticate"] == 'Bearer realm="olla"'
    assert "X-Olla-Endpoint" not in r.headers
    for path in ("/olla/models", "/olla/llamacpp/v1/models", "/nowhere"):
        assert (await client.get(path, headers=headers)).status == 401, path


async def test_health_stays_open_and_status_routes_need_a_key(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server=AUTH)
    assert (await client.get("/internal/health")).status == 200
    assert (await client.get("/internal/health", headers=bearer("wrong"))).status == 200
    for path in ("/internal/status", "/internal/status/endpoints", "/internal/status/models", "/metrics"):
        refused = await client.get(path)
        assert refused.status == 401 and (await refused.json())["error"]["code"] == "invalid_api_key", path
        assert (await client.get(path, headers=bearer(KEY_A))).status == 200, path


async def test_status_routes_open_when_protect_status_is_false(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server={"auth": {**AUTH["auth"], "protect_status": False}})
    for path in ("/internal/status", "/internal/status/endpoints", "/internal/status/models", "/metrics"):
        assert (await client.get(path)).status == 200, path
    assert (await post(client, chat())).status == 401  # the API itself still needs a key


async def test_keys_from_openai_api_keys_open_the_router(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], env={"OPENAI_API_KEYS": "key_a:team_a,key_c"})
    assert (await post(client, chat(), headers=bearer("key_a"))).status == 200
    assert (await post(client, chat(), headers={"X-Api-Key": "key_c"})).status == 200
    assert (await post(client, chat(), headers=bearer("key_b"))).status == 401
    metrics = await (await client.get("/metrics", headers=bearer("key_c"))).text()
    assert 'olla_client_requests_total{client="team_a",code="200",route="/v1/chat/completions"} 1.0' in metrics
    generated = generated_client("key_c")
    assert f'olla_client_requests_total{{client="{generated}",code="200",route="/v1/chat/completions"}} 1.0' in metrics


async def test_client_in_access_log_and_metrics_key_nowhere(start_sims, make_router, caplog, access_lines) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server=AUTH)
    with caplog.at_level(logging.DEBUG):
        await post(client, chat(), headers=bearer(KEY_A))
        await post(client, chat(), headers={"X-Api-Key": KEY_B})
        await post(client, chat(), headers=bearer(KEY_A + "-forged"))
        await post(client, chat())
    lines = access_lines()
    assert [(r["client"], r["status"]) for r in lines] == [("team-a", 200), ("team-b", 200), (None, 401), (None, 401)]
    metrics = await (await client.get("/metrics", headers=bearer(KEY_A))).text()
    assert 'olla_client_requests_total{client="team-a",code="200",route="/v1/chat/completions"} 1.0' in metrics
    assert 'olla_client_requests_total{client="team-b",code="200",route="/v1/chat/completions"} 1.0' in metrics
    assert 'olla_client_requests_total{client="anonymous",code="401",route="other"} 2.0' in metrics
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records) + str(lines)
    for secret in (KEY_A, KEY_B):
        assert secret not in logged and secret not in metrics


async def test_without_keys_every_route_is_open_and_the_client_is_anonymous(start_sims, make_router, access_lines) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)])
    assert (await post(client, chat(), headers=bearer("anything"))).status == 200
    assert [r["client"] for r in access_lines()] == [None]
    metrics = await (await client.get("/metrics")).text()
    assert 'olla_client_requests_total{client="anonymous",code="200",route="/v1/chat/completions"} 1.0' in metrics


async def test_client_keys_never_reach_an_endpoint(aiohttp_server, make_router) -> None:
    seen: list[dict[str, str]] = []

    async def tokenize(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"tokens": [1]})

    url = await fake_endpoint(aiohttp_server, tokenize)
    client = await make_router([{"name": "fake", "url": url, "headers": {"Authorization": "Bearer backend-key"}}],
                               server=AUTH)  # fmt: skip
    body = {"content": "hi", "model": CHAT}
    r = await post(client, body, "/olla/llamacpp/tokenize", headers={**bearer(KEY_A), "X-Api-Key": KEY_B})
    assert r.status == 200
    r = await post(client, body, "/olla/llamacpp/tokenize", headers={"X-Api-Key": KEY_B})
    assert r.status == 200
    assert [h.get("Authorization") for h in seen] == ["Bearer backend-key"] * 2
    assert all("X-Api-Key" not in h for h in seen)
    assert all(KEY_A not in str(h) and KEY_B not in str(h) for h in seen)


async def test_backend_key_comes_from_endpoint_headers_only(start_sims, make_router) -> None:
    (a,) = await start_sims(fast(api_key="backend-key"))
    client = await make_router([ep("a", a, headers={"Authorization": "Bearer backend-key"})], server=AUTH)
    r = await post(client, chat(), headers=bearer(KEY_A))
    assert r.status == 200 and r.headers["X-Olla-Endpoint"] == "a"
