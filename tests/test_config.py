"""config.py: what a user sees when a config file is right, and what they read when it is wrong."""

from __future__ import annotations

import re
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest

from olla.admission_config import RateLimitConfig
from olla.config import (
    SHIPPED_PROFILES_DIR,
    Config,
    EndpointConfig,
    ProxyConfig,
    RetryConfig,
    ServerConfig,
    find_config_path,
    load_config,
    parse_config,
)
from olla.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def problems(data: Any, env: dict[str, str] | None = None, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "test.yaml", env or {}, **kwargs)
    return caught.value.problems


def one_problem(data: Any, env: dict[str, str] | None = None) -> str:
    found = problems(data, env)
    assert len(found) == 1, found
    return found[0]


def endpoints(*items: dict[str, Any]) -> dict[str, Any]:
    return {"discovery": {"static": {"endpoints": list(items)}}}


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- defaults and every key ---------------------------------------------------------------


def test_empty_config_is_the_defaults() -> None:
    for data in (None, {}):
        config = parse_config(data, "empty.yaml", {})
        assert config.server == ServerConfig("localhost", 40114, 100 * 1024 * 1024, 10.0)
        assert config.proxy == ProxyConfig("slot-aware", 10.0, 900.0, 600.0, RetryConfig(True, 0))
        assert config.discovery.endpoints == ()
        assert config.discovery.model_discovery_interval == 300.0
        assert dict(config.model_aliases) == {}
        assert (config.logging.level, config.logging.format) == ("info", "json")
        assert set(config.profiles) == {"llamacpp"}
        assert config.source == "empty.yaml"


def test_config_built_in_code_has_the_shipped_profiles() -> None:
    config = Config(discovery=Config().discovery)
    assert config.profiles["llamacpp"].prefixes == ("llamacpp",)
    assert config.source == "<defaults>"


def test_empty_file_loads(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing yet\n"), env={}).discovery.endpoints == ()


def test_every_key_is_parsed(tmp_path: Path) -> None:
    text = """
server:
  host: 0.0.0.0
  port: 8000
  request_limits: {max_body_size: 10MB}
  shutdown_timeout: 30s
proxy:
  load_balancer: round-robin
  connection_timeout: 3s
  response_timeout: 1h
  read_timeout: 90
  retry: {enabled: false, max_attempts: 3}
discovery:
  type: static
  model_discovery: {interval: 1m30s}
  static:
    endpoints:
      - name: a
        url: https://Box.example:8443/base/
        type: llamacpp
        priority: 7
        model_url: /models
        health_check_url: http://probe.example/health?deep=1
        check_interval: 500ms
        check_timeout: 200ms
        headers: {Authorization: Bearer k}
model_aliases:
  chat: [m1, m2]
logging: {level: DEBUG, format: text}
"""
    config = load_config(write(tmp_path, text), env={})
    assert config.server == ServerConfig("0.0.0.0", 8000, 10_000_000, 30.0)
    assert config.proxy == ProxyConfig("round-robin", 3.0, 3600.0, 90.0, RetryConfig(False, 3))
    assert config.discovery.model_discovery_interval == 90.0
    (endpoint,) = config.discovery.endpoints
    assert endpoint == EndpointConfig(
        name="a",
        url="https://box.example:8443/base",
        type="llamacpp",
        priority=7,
        model_url="https://box.example:8443/base/models",
        health_check_url="http://probe.example/health?deep=1",
        check_interval=0.5,
        check_timeout=0.2,
        headers={"Authorization": "Bearer k"},
    )
    assert dict(config.model_aliases) == {"chat": ("m1", "m2")}
    assert (config.logging.level, config.logging.format) == ("debug", "text")
    assert config.source == str(tmp_path / "config.yaml")


def test_endpoint_defaults_come_from_the_profile() -> None:
    (endpoint,) = parse_config(endpoints({"name": "a", "url": "http://127.0.0.1:8080"}), "t", {}).discovery.endpoints
    assert endpoint.type == "llamacpp"
    assert endpoint.priority == 100
    assert (endpoint.check_interval, endpoint.check_timeout) == (5.0, 2.0)
    assert endpoint.model_url == "http://127.0.0.1:8080/v1/models"
    assert endpoint.health_check_url == "http://127.0.0.1:8080/health"
    assert dict(endpoint.headers) == {}


def test_short_check_interval_alone_gets_a_shorter_timeout() -> None:
    item = {"name": "a", "url": "http://h", "check_interval": "1s"}
    (endpoint,) = parse_config(endpoints(item), "t", {}).discovery.endpoints
    assert endpoint.check_timeout == 0.5


def test_config_is_frozen_and_read_only() -> None:
    config = parse_config(endpoints({"name": "a", "url": "http://h", "headers": {"X-A": "1"}}), "t", {})
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.discovery.endpoints[0].headers["X-B"] = "2"  # type: ignore[index]
    assert hash(config.discovery.endpoints[0])  # usable as a dict key by the registry


# ---- durations and sizes ------------------------------------------------------------------


def test_bad_duration_in_config_names_key_value_and_forms() -> None:
    message = one_problem({"proxy": {"read_timeout": "ten minutes"}})
    assert message == (
        "test.yaml: proxy.read_timeout: not a duration: got 'ten minutes'; "
        "expected a duration such as 500ms, 5s, 15m, 1h or 1m30s (plain numbers are seconds), above zero"
    )


def test_negative_and_zero_timeouts_are_errors() -> None:
    assert "negative duration: got '-5s'" in one_problem({"server": {"shutdown_timeout": "-5s"}})
    assert "too short: got 0" in one_problem({"proxy": {"connection_timeout": 0}})


def test_bad_size_in_config() -> None:
    message = one_problem({"server": {"request_limits": {"max_body_size": "lots"}}})
    assert message.startswith("test.yaml: server.request_limits.max_body_size: not a size: got 'lots'; expected a size")


# ---- ${VAR} expansion ---------------------------------------------------------------------


def test_env_expansion_in_strings() -> None:
    data = endpoints(
        {"name": "${NAME}", "url": "http://${HOST:-127.0.0.1}:${PORT:-8080}", "headers": {"X-Cost": "$$5"}}
    )
    (endpoint,) = parse_config(data, "t", {"NAME": "gpu-0", "PORT": "9000"}).discovery.endpoints
    assert (endpoint.name, endpoint.url) == ("gpu-0", "http://127.0.0.1:9000")
    assert endpoint.headers["X-Cost"] == "$5"


def test_empty_variable_takes_the_default() -> None:
    config = parse_config({"server": {"host": "${HOST:-0.0.0.0}"}}, "t", {"HOST": ""})
    assert config.server.host == "0.0.0.0"


def test_escaped_dollar_is_not_expanded() -> None:
    config = parse_config({"server": {"host": "$${HOST}"}}, "t", {"HOST": "x"})
    assert config.server.host == "${HOST}"


def test_expanded_text_fills_numbers_and_booleans() -> None:
    env = {"PORT": "8000", "RETRY": "false", "TRIES": "2"}
    data = {"server": {"port": "${PORT}"}, "proxy": {"retry": {"enabled": "${RETRY}", "max_attempts": "${TRIES}"}}}
    config = parse_config(data, "t", env)
    assert config.server.port == 8000
    assert config.proxy.retry == RetryConfig(False, 2)


def test_a_quoted_number_without_a_variable_is_still_a_wrong_type() -> None:
    assert one_problem({"server": {"port": "8000"}}) == (
        "test.yaml: server.port: wrong type: got '8000'; expected an integer port from 1 to 65535"
    )


def test_expanded_value_cannot_inject_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  host: ${HOST}\n")
    config = load_config(path, env={"HOST": "x\nproxy: {load_balancer: priority}"})
    assert config.server.host.startswith("x\nproxy")
    assert config.proxy.load_balancer == "slot-aware"


def test_missing_variable_names_key_and_variable() -> None:
    assert one_problem({"server": {"host": "${OLLA_HOST}"}}) == (
        "test.yaml: server.host: environment variable OLLA_HOST is not set: got '${OLLA_HOST}'; "
        "expected OLLA_HOST set, or a default as in ${OLLA_HOST:-value}"
    )


@pytest.mark.parametrize("text", ["${", "${1X}", "${A-b}", "${A:-${B}}"])
def test_malformed_references_are_errors(text: str) -> None:
    assert "test.yaml: server.host: " in one_problem({"server": {"host": text}}, {"A": "a", "B": "b"})


def test_load_config_uses_process_environment_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLA_TEST_PORT", "4321")
    assert load_config(write(tmp_path, "server: {port: '${OLLA_TEST_PORT}'}\n")).server.port == 4321


# ---- unknown keys and wrong types ---------------------------------------------------------


def test_unknown_key_suggests_the_closest() -> None:
    assert one_problem({"proxy": {"load_balancr": "priority"}}) == (
        "test.yaml: proxy.load_balancr: unknown key (did you mean load_balancer?): got 'load_balancr'; "
        "expected one of load_balancer, connection_timeout, response_timeout, read_timeout, header_timeout, retry, queue, affinity"
    )


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"serve": {}}, "serve: unknown key (did you mean server?)"),
        (
            {"server": {"request_limits": {"max_body": 1}}},
            "server.request_limits.max_body: unknown key (did you mean max_body_size?)",
        ),
        ({"proxy": {"retry": {"max_retries": 1}}}, "proxy.retry.max_retries: unknown key"),
        ({"discovery": {"model_discovery": {"enabled": True}}}, "discovery.model_discovery.enabled: unknown key"),
        (
            endpoints({"name": "a", "url": "http://h", "prio": 1}),
            "discovery.static.endpoints[0].prio: unknown key (did you mean priority?)",
        ),
        ({"logging": {"output": "stdout"}}, "logging.output: unknown key"),
    ],
)
def test_unknown_keys_at_every_level(data: dict[str, Any], path: str) -> None:
    assert one_problem(data).startswith(f"test.yaml: {path}")


@pytest.mark.parametrize(
    ("data", "start"),
    [
        ([1, 2], "test.yaml: (document): wrong type: got [1, 2]; expected a mapping"),
        ({"server": "big"}, "test.yaml: server: wrong type: got 'big'; expected a mapping"),
        ({"server": {"port": 80.5}}, "test.yaml: server.port: wrong type: got 80.5"),
        ({"server": {"port": True}}, "test.yaml: server.port: wrong type: got True"),
        ({"server": {"port": 70000}}, "test.yaml: server.port: out of range: got 70000"),
        ({"server": {"host": None}}, "test.yaml: server.host: wrong type: got None"),
        (
            {"proxy": {"retry": {"enabled": "yes"}}},
            "test.yaml: proxy.retry.enabled: wrong type: got 'yes'; expected true or false",
        ),
        ({"proxy": {"retry": {"max_attempts": -1}}}, "test.yaml: proxy.retry.max_attempts: out of range: got -1"),
        ({"discovery": {"static": {"endpoints": {"a": 1}}}}, "test.yaml: discovery.static.endpoints: wrong type"),
        (endpoints("http://h"), "test.yaml: discovery.static.endpoints[0]: wrong type: got 'http://h'"),
        (
            endpoints({"name": "a", "url": "http://h", "priority": -1}),
            "test.yaml: discovery.static.endpoints[0].priority: out of range",
        ),
        (endpoints({"name": 5, "url": "http://h"}), "test.yaml: discovery.static.endpoints[0].name: wrong type: got 5"),
        (
            {"model_aliases": {"chat": "m1"}},
            "test.yaml: model_aliases.chat: wrong type: got 'm1'; expected a non-empty list",
        ),
        ({"model_aliases": {"chat": []}}, "test.yaml: model_aliases.chat: empty list"),
        ({"model_aliases": {" chat": ["m"]}}, "test.yaml: model_aliases[' chat']: bad alias name"),
        ({"model_aliases": {"chat": ["m ", ""]}}, "test.yaml: model_aliases.chat[0]: empty or padded"),
        ({"logging": {"level": "warn"}}, "test.yaml: logging.level: unknown value (did you mean warning?): got 'warn'"),
        (
            {"logging": {"format": "xml"}},
            "test.yaml: logging.format: unknown value: got 'xml'; expected one of json, text",
        ),
        (
            {"discovery": {"type": "dynamic"}},
            "test.yaml: discovery.type: unknown value: got 'dynamic'; expected static",
        ),
    ],
)
def test_wrong_types_and_values(data: Any, start: str) -> None:
    assert problems(data)[0].startswith(start)


def test_unknown_balancer_suggests_a_known_one() -> None:
    assert one_problem({"proxy": {"load_balancer": "round_robin"}}) == (
        "test.yaml: proxy.load_balancer: unknown value (did you mean round-robin?): got 'round_robin'; "
        "expected one of slot-aware, priority, round-robin, least-connections"
    )


def test_all_problems_are_reported_at_once() -> None:
    data = {"server": {"port": "x"}, "proxy": {"load_balancer": "fastest"}, "logging": {"level": "loud"}, "extra": 1}
    found = problems(data)
    assert [p.split(": ")[1] for p in found] == ["extra", "server.port", "proxy.load_balancer", "logging.level"]


# ---- endpoints ----------------------------------------------------------------------------


def test_userinfo_url_is_rejected_without_echoing_the_password() -> None:
    message = one_problem(endpoints({"name": "a", "url": "http://admin:hunter2@h:8080"}))
    assert message.startswith(
        "test.yaml: discovery.static.endpoints[0].url: credentials (user:pass@) in the URL are not allowed"
    )
    assert "got 'http://admin:***@h:8080'" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://h", "unsupported scheme"),
        ("h:8080", "unsupported scheme"),
        ("127.0.0.1:8080", "not an absolute URL"),
        ("http://", "no host"),
        ("http://h:99999", "bad port"),
        ("http://h/?a=1", "a ?query is not allowed"),
        ("", "empty or contains whitespace"),
        (" http://h", "empty or contains whitespace"),
    ],
)
def test_bad_endpoint_urls(url: str, problem: str) -> None:
    message = one_problem(endpoints({"name": "a", "url": url}))
    assert message.startswith(f"test.yaml: discovery.static.endpoints[0].url: {problem}")
    assert message.endswith("expected an http:// or https:// URL with a host, such as http://127.0.0.1:8080")


def test_required_endpoint_keys() -> None:
    assert problems(endpoints({"priority": 1})) == [
        "test.yaml: discovery.static.endpoints[0].name: missing required key: got nothing; "
        "expected a unique, non-empty name",
        "test.yaml: discovery.static.endpoints[0].url: missing required key: got nothing; "
        "expected an http:// or https:// URL with a host, such as http://127.0.0.1:8080",
    ]


def test_duplicate_names() -> None:
    assert one_problem(endpoints({"name": "a", "url": "http://h1"}, {"name": "a", "url": "http://h2"})) == (
        "test.yaml: discovery.static.endpoints[1].name: duplicate name (also at discovery.static.endpoints[0].name): "
        "got 'a'; expected a name no other endpoint uses"
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("http://h:8080", "http://h:8080/"),
        ("http://H:8080", "HTTP://h:8080"),
        ("http://h", "http://h:80"),
        ("https://h/api", "https://h:443/api/"),
    ],
)
def test_duplicate_urls_after_normalising(first: str, second: str) -> None:
    message = one_problem(endpoints({"name": "a", "url": first}, {"name": "b", "url": second}))
    assert message.startswith(
        "test.yaml: discovery.static.endpoints[1].url: duplicate URL (also at discovery.static.endpoints[0].url)"
    )


def test_different_ports_or_paths_are_different_endpoints() -> None:
    data = endpoints(
        {"name": "a", "url": "http://h:8080"},
        {"name": "b", "url": "http://h:8081"},
        {"name": "c", "url": "http://h:8080/x"},
    )
    assert len(parse_config(data, "t", {}).discovery.endpoints) == 3


@pytest.mark.parametrize(("interval", "timeout"), [("2s", "2s"), ("2s", "3s"), ("1s", 1)])
def test_check_timeout_must_be_below_check_interval(interval: str, timeout: object) -> None:
    message = one_problem(
        endpoints({"name": "a", "url": "http://h", "check_interval": interval, "check_timeout": timeout})
    )
    assert message.startswith(
        "test.yaml: discovery.static.endpoints[0].check_timeout: not less than check_interval: got "
    )
    assert "expected a duration below check_interval" in message


def test_check_interval_minimum() -> None:
    message = one_problem(
        endpoints({"name": "a", "url": "http://h", "check_interval": "50ms", "check_timeout": "10ms"})
    )
    assert message.startswith("test.yaml: discovery.static.endpoints[0].check_interval: too short: got '50ms'")
    assert message.endswith("at least 100ms")


def test_unknown_endpoint_type() -> None:
    assert one_problem(endpoints({"name": "a", "url": "http://h", "type": "llama-cpp"})) == (
        "test.yaml: discovery.static.endpoints[0].type: unknown endpoint type (did you mean llamacpp?): "
        "got 'llama-cpp'; expected a loaded profile: llamacpp"
    )


def test_model_and_health_urls() -> None:
    item = {
        "name": "a",
        "url": "http://h:8080/prefix",
        "model_url": "v1/models?x=1",
        "health_check_url": "HTTPS://Other/up",
    }
    (endpoint,) = parse_config(endpoints(item), "t", {}).discovery.endpoints
    assert endpoint.model_url == "http://h:8080/prefix/v1/models?x=1"
    assert endpoint.health_check_url == "https://other/up"


@pytest.mark.parametrize("target", ["ftp://h/health", "http://u:p@h/health", "/he alth", 5])
def test_bad_model_or_health_urls(target: object) -> None:
    message = one_problem(endpoints({"name": "a", "url": "http://h", "health_check_url": target}))
    assert message.startswith("test.yaml: discovery.static.endpoints[0].health_check_url: ")
    assert ":p@" not in message


# ---- headers are secrets ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"Authorization": 12345}, "wrong type"),
        ({"Authorization": "Bearer sk-SECRET\r\nX-Evil: 1"}, "header value contains a line break"),
        ({"Authorization": "Bearer ${SECRET_UNSET}"}, "environment variable SECRET_UNSET is not set"),
        ({"Authorization": "sk-SECRET ${"}, "unterminated ${"),
        ({"Authorization": "   "}, "empty header value"),
    ],
)
def test_header_values_are_never_echoed(headers: dict[str, Any], problem: str) -> None:
    message = one_problem(endpoints({"name": "a", "url": "http://h", "headers": headers}))
    assert message.startswith(
        f"test.yaml: discovery.static.endpoints[0].headers.Authorization: {problem}: got <redacted>; expected "
    )
    assert "SECRET" not in message.replace("SECRET_UNSET", "")
    assert "12345" not in message


def test_headers_that_are_not_a_mapping_are_not_echoed() -> None:
    message = one_problem(endpoints({"name": "a", "url": "http://h", "headers": ["Authorization: Bearer sk-SECRET"]}))
    assert "sk-SECRET" not in message
    assert "got <redacted>" in message


def test_header_values_are_not_in_repr() -> None:
    config = parse_config(
        endpoints({"name": "a", "url": "http://h", "headers": {"X-Key": "${KEY}"}}), "t", {"KEY": "sk-SECRET"}
    )
    assert config.discovery.endpoints[0].headers["X-Key"] == "sk-SECRET"
    assert "sk-SECRET" not in repr(config)


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"Bad Name": "v"}, "bad header name"),
        ({"Host": "x"}, "header set by olla itself"),
        ({"X-A": "1", "x-a": "2"}, "duplicate header"),
    ],
)
def test_bad_header_names(headers: dict[str, str], problem: str) -> None:
    assert problem in one_problem(endpoints({"name": "a", "url": "http://h", "headers": headers}))


# ---- files --------------------------------------------------------------------------------


def test_shipped_example_config_loads() -> None:
    config = load_config(REPO / "config.yaml", env={"LLAMA_API_KEY": "k"})
    assert [e.url for e in config.discovery.endpoints] == [
        "http://127.0.0.1:8080",
        "http://127.0.0.1:8081",
        "http://127.0.0.1:8082",
    ]
    assert config.discovery.endpoints[2].headers["Authorization"] == "Bearer k"
    assert config.proxy == ProxyConfig()
    assert config.server == ServerConfig()


def test_yaml_syntax_error_names_file_and_line_only(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 1\n headers: {Authorization: 'sk-SECRET'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    (message,) = caught.value.problems
    assert message.startswith(f"{path}: line 3, column 2: invalid YAML: ")
    assert "sk-SECRET" not in message


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 1\n  port: 2\n")
    with pytest.raises(ConfigError, match=r"line 3, column 3: invalid YAML: duplicate key 'port'"):
        load_config(path, env={})


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    text = """
discovery:
  static:
    endpoints:
      - &base {name: a, url: 'http://h1', priority: 5, check_interval: 10s}
      - {<<: *base, name: b, url: 'http://h2', priority: 9}
"""
    first, second = load_config(write(tmp_path, text), env={}).discovery.endpoints
    assert (second.name, second.url, second.priority, second.check_interval) == ("b", "http://h2", 9, 10.0)
    assert first.priority == 5


def test_error_messages_carry_the_file_path(tmp_path: Path) -> None:
    path = write(tmp_path, "proxy:\n  load_balancer: fastest\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(f"{path}: proxy.load_balancer: unknown value: got 'fastest'; expected one of ")


# ---- lookup order -------------------------------------------------------------------------


def test_lookup_order(tmp_path: Path) -> None:
    cli, from_env, local = (write(tmp_path, "", name) for name in ("cli.yaml", "env.yaml", "config.yaml"))
    env = {"OLLA_CONFIG": str(from_env)}
    assert find_config_path(str(cli), env, tmp_path) == cli
    assert find_config_path(None, env, tmp_path) == from_env
    assert find_config_path(None, {}, tmp_path) == local
    assert find_config_path("cli.yaml", {}, tmp_path) == cli  # relative to cwd


@pytest.mark.parametrize(
    ("cli", "env", "origin"), [("nope.yaml", {}, "-c"), (None, {"OLLA_CONFIG": "nope.yaml"}, "$OLLA_CONFIG")]
)
def test_named_config_that_does_not_exist(tmp_path: Path, cli: str | None, env: dict[str, str], origin: str) -> None:
    write(tmp_path, "")  # ./config.yaml exists, yet a named file that is missing must not fall back to it
    with pytest.raises(ConfigError, match="^" + re.escape(f"nope.yaml: config file named by {origin} not found: got ")):
        find_config_path(cli, env, tmp_path)


def test_no_config_anywhere(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config file"):
        find_config_path(None, {}, tmp_path)


# ---- profiles through the config ----------------------------------------------------------


def test_profiles_dir_adds_and_replaces_profiles(tmp_path: Path) -> None:
    shipped = (SHIPPED_PROFILES_DIR / "llamacpp.yaml").read_text()
    mine = tmp_path / "profiles"
    mine.mkdir()
    (mine / "llamacpp.yaml").write_text(
        shipped.replace("name: llama-cpp\n      enabled: false", "name: llama-cpp\n      enabled: true")
    )
    (mine / "fork.yaml").write_text(
        "name: ik-llama\nrouting: {prefixes: [ik]}\napi: {routes: {/v1/models: {methods: [GET]}}}\n"
    )
    path = write(
        tmp_path,
        "profiles_dir: profiles\ndiscovery: {static: {endpoints: [{name: a, url: 'http://h', type: ik-llama}]}}\n",
    )
    config = load_config(path, env={})
    assert config.profiles["llamacpp"].prefixes == ("llamacpp", "llama-cpp")
    assert config.profiles["ik-llama"].prefixes == ("ik",)
    assert config.discovery.endpoints[0].type == "ik-llama"


def test_profiles_dir_must_exist(tmp_path: Path) -> None:
    (message,) = problems({"profiles_dir": "missing"}, base_dir=tmp_path)
    assert (
        message == f"test.yaml: profiles_dir: not a directory: got '{tmp_path / 'missing'}'; "
        f"expected a directory of profile *.yaml files"
    )


def test_profile_problems_are_reported_with_the_config(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("name: broken\nroutng: {}\n")
    found = problems({"profiles_dir": str(tmp_path), "logging": {"level": "loud"}})
    assert any(p.startswith(f"{tmp_path / 'broken.yaml'}: routng: unknown key (did you mean routing?)") for p in found)
    assert any(p.startswith("test.yaml: logging.level: unknown value") for p in found)


def test_prefix_claimed_by_two_profiles(tmp_path: Path) -> None:
    (tmp_path / "copy.yaml").write_text(
        "name: copy\nrouting: {prefixes: [llamacpp]}\napi: {routes: {/v1/models: {methods: [GET]}}}\n"
    )
    (message,) = problems({"profiles_dir": str(tmp_path)})
    assert message.startswith(
        f"{tmp_path / 'copy.yaml'}: routing.prefixes: prefix already enabled by profile 'llamacpp'"
    )


# ---- server.auth, server.rate_limits, server.cors ------------------------------------------


def test_admission_sections_default_to_off() -> None:
    server = parse_config({"server": {"auth": None, "rate_limits": {}, "cors": None}}, "test.yaml", {}).server
    assert server == ServerConfig()
    assert not server.auth.enabled and server.auth.protect_status
    assert server.rate_limits == RateLimitConfig() and server.rate_limits.burst_size == 50
    assert not server.cors.enabled and server.cors.allowed_origins == ("*",)


def test_key_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "team.key").write_text("sk-from-file\n")
    elsewhere = tmp_path / "conf"
    elsewhere.mkdir()
    (elsewhere / "team.key").write_text("sk-next-to-config\n")
    path = write(elsewhere, "server:\n  auth:\n    api_keys:\n      - {key_file: team.key, client: team}\n")
    (key,) = load_config(path, env={}).server.auth.api_keys
    assert (key.client, key.key) == ("team", "sk-next-to-config")


def test_admission_problems_are_reported_with_the_rest() -> None:
    found = problems({
        "server": {
            "port": 0,
            "auth": {"api_keys": [{"key": "sk-secret-value", "client": "a"}, {"key": "sk-secret-value"}]},
            "rate_limits": {"per_ip_requests_per_minute": -1, "trusted_proxy_cidrs": ["10.0.0.0/8", "10.0.0.300/8"]},
            "cors": {"allowed_origins": ["*"], "allow_credentials": True},
        },
    })  # fmt: skip
    assert [p.split(": ")[1] for p in found] == [
        "server.port",
        "server.auth.api_keys[1]",
        "server.rate_limits.per_ip_requests_per_minute",
        "server.rate_limits.trusted_proxy_cidrs[1]",
        "server.cors.allow_credentials",
    ]
    assert not any("sk-secret-value" in p for p in found)


def test_unknown_server_key_lists_the_new_sections() -> None:
    (message,) = problems({"server": {"rate_limit": {}}})
    assert message.startswith("test.yaml: server.rate_limit: unknown key (did you mean rate_limits?)")
    assert "auth, rate_limits, cors" in message


def test_openai_api_keys_come_from_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEYS", "key_a:team_a,key_c")
    keys = load_config(write(tmp_path, ""))
    assert [k.client for k in keys.server.auth.api_keys] == ["team_a", "client-" + sha256(b"key_c").hexdigest()[:8]]
    assert load_config(write(tmp_path, ""), env={}).server.auth.api_keys == ()


def test_the_commented_auth_example_loads_once_uncommented(tmp_path: Path) -> None:
    lines = (REPO / "config.yaml").read_text().splitlines()
    start = lines.index("  # auth:")
    end = start + 1
    while lines[end].startswith("  #   "):
        end += 1
    uncommented = ["  auth:"] + ["  " + line[len("  # "):] for line in lines[start + 1 : end]]
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "team-b.key").write_text("sk-team-b\n")
    path = write(tmp_path, "\n".join(lines[:start] + uncommented + lines[end:]))
    auth = load_config(path, env={"LLAMA_API_KEY": "k", "TEAM_A_KEY": "sk-team-a"}).server.auth
    assert [(k.client, k.key) for k in auth.api_keys] == [("team-a", "sk-team-a"), ("team-b", "sk-team-b")]
    assert auth.protect_status
