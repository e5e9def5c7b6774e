"""YAML -> frozen dataclasses, validated once; the only module that imports yaml.

`load_config` reads a file; `parse_config` validates already-parsed data. Every
problem is collected (`olla.checks`), then one `ConfigError` lists them all, each as
`<file>: <key.path[index]>: <problem>: got <value>; expected <what>`.
Header values and API keys are secrets and are never echoed. What a single value may
look like (durations, sizes, `${VAR}`, URLs) is `olla.values`; this module knows the keys,
except those of `server.auth`, `server.rate_limits` and `server.cors` (`olla.admission_config`).

Profiles are read here too (they are YAML) and validated by the pure
`olla.profiles.parse_profile`, because endpoint `type` must name a loaded profile.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import os
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from olla.admission_config import AuthConfig, CorsConfig, RateLimitConfig, parse_auth, parse_cors, parse_rate_limits
from olla.checks import Bad, Checks, NotExpanded, key_path
from olla.errors import ConfigError
from olla.profiles import HEADER_NAME_PATTERN, Profile, parse_profile, prefix_conflicts
from olla.values import (
    DURATION_EXPECTED,
    SIZE_EXPECTED,
    UnsetVariable,
    base_url,
    boolean,
    choice,
    duration,
    header_value,
    integer,
    size,
    target_url,
    text,
    url_key,
    without_password,
)

# Re-exported: callers import the value grammar from olla.config too.
from olla.values import expand_env as expand_env
from olla.values import join_url as join_url
from olla.values import parse_duration as parse_duration
from olla.values import parse_size as parse_size

SHIPPED_PROFILES_DIR = Path(__file__).parent / "profiles"
BALANCERS = ("slot-aware", "priority", "round-robin", "least-connections")  # names in olla.balancer.BALANCERS
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
# Set by olla or aiohttp per request; a configured value would break the exchange.
MANAGED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade", "te"})


@dataclass(frozen=True)
class ServerConfig:
    host: str = "localhost"
    port: int = 40114
    max_body_size: int = 100 * 1024 * 1024
    shutdown_timeout: float = 10.0
    auth: AuthConfig = AuthConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    cors: CorsConfig = CorsConfig()


@dataclass(frozen=True)
class RetryConfig:
    enabled: bool = True
    max_attempts: int = 0  # 0: every candidate once


@dataclass(frozen=True)
class QueueConfig:
    max_size: int = 256  # per model; 0: answer 503 at once when every slot is busy
    timeout: float = 30.0


@dataclass(frozen=True)
class AffinityConfig:
    enabled: bool = True
    max_entries: int = 10_000
    ttl: float = 600.0  # idle time after which a conversation is forgotten
    hold: float = 0.1  # a finished turn's slot stays claimed this long for the conversation's next turn


@dataclass(frozen=True)
class ProxyConfig:
    load_balancer: str = "slot-aware"
    connection_timeout: float = 10.0
    response_timeout: float = 900.0
    read_timeout: float = 600.0
    retry: RetryConfig = RetryConfig()
    queue: QueueConfig = QueueConfig()
    affinity: AffinityConfig = AffinityConfig()
    header_timeout: float = 10.0  # routes that take no slot: silence before headers means a stuck endpoint


@dataclass(frozen=True)
class EndpointConfig:
    """After `load_config`, `model_url` and `health_check_url` are absolute URLs.

    None (only in an EndpointConfig built in code) means the profile's path.
    """

    name: str
    url: str
    type: str = "llamacpp"
    priority: int = 100
    model_url: str | None = None
    health_check_url: str | None = None
    check_interval: float = 5.0
    check_timeout: float = 2.0
    slots: int | None = None  # used when the endpoint reports none (no /props, /slots off)
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False, repr=False)  # secrets


@dataclass(frozen=True)
class DiscoveryConfig:
    endpoints: tuple[EndpointConfig, ...] = ()
    model_discovery_interval: float = 300.0
    slots_interval: float = 2.0  # /slots reconciliation; at least 1s


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "json"


@functools.cache
def default_profiles() -> Mapping[str, Profile]:
    """The shipped profiles, read once."""
    return MappingProxyType(load_profiles(SHIPPED_PROFILES_DIR))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    proxy: ProxyConfig = ProxyConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    model_aliases: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    logging: LoggingConfig = LoggingConfig()
    profiles: Mapping[str, Profile] = field(default_factory=default_profiles, hash=False)
    source: str = "<defaults>"
    sha256: str | None = None  # of the file's bytes, when the config was loaded from one


# ---- lookup and loading -------------------------------------------------------------------


def find_config_path(cli_path: str | None, env: Mapping[str, str], cwd: str | Path | None = None) -> Path:
    """`-c`, then `$OLLA_CONFIG`, then `./config.yaml`; a named file that is missing is an error."""
    base = Path.cwd() if cwd is None else Path(cwd)
    for origin, named in (("-c", cli_path), ("$OLLA_CONFIG", env.get("OLLA_CONFIG"))):
        if named:
            path = base / Path(named).expanduser()
            if not path.is_file():
                raise ConfigError(
                    [
                        f"{named}: config file named by {origin} not found: got {str(path)!r}; "
                        "expected an existing YAML file"
                    ]
                )
            return path
    default = base / "config.yaml"
    if default.is_file():
        return default
    raise ConfigError(
        [
            f"{default}: no config file: got no -c, no $OLLA_CONFIG and no {default.name}; "
            "expected one of them to name a file"
        ]
    )


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    problems: list[str] = []
    content = _read_bytes(Path(path), problems)
    data = _parse_yaml(Path(path), content, problems) if content is not None else None
    if problems or content is None:
        raise ConfigError(problems)
    config = parse_config(data, str(path), env, base_dir=Path(path).parent)
    return dataclasses.replace(config, sha256=hashlib.sha256(content).hexdigest())


def load_profiles(directory: str | Path) -> dict[str, Profile]:
    """Every `*.yaml`/`*.yml` profile in one directory, keyed by name."""
    problems: list[str] = []
    profiles = _profiles_in(Path(directory), problems)
    problems += prefix_conflicts(profiles)
    if problems:
        raise ConfigError(problems)
    return profiles


def _profiles_in(directory: Path, problems: list[str]) -> dict[str, Profile]:
    profiles: dict[str, Profile] = {}
    if not directory.is_dir():
        problems.append(f"{directory}: profiles directory not found")
        return profiles
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and not p.name.startswith("."))
    for path in files:
        before = len(problems)
        data = _read_yaml(path, problems)
        if len(problems) > before:
            continue
        try:
            profile = parse_profile(data, str(path))
        except ConfigError as exc:
            problems += exc.problems
            continue
        if profile.name in profiles:
            problems.append(
                f"{path}: name: profile name already used by {profiles[profile.name].source}: "
                f"got {profile.name!r}; expected one file per profile name"
            )
        profiles[profile.name] = profile
    return profiles


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key given twice in one mapping instead of keeping the last."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    own = sum(1 for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)  # puts `<<` merged pairs first; the node's own pairs may override them
    mapping: dict[Any, Any] = {}
    given: set[Any] = set()
    for index, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar", key_node.start_mark)
        if index >= len(node.value) - own:
            if key in given:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            given.add(key)
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path, problems: list[str]) -> Any:
    content = _read_bytes(path, problems)
    return _parse_yaml(path, content, problems) if content is not None else None


def _read_bytes(path: Path, problems: list[str]) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror or exc}")
        return None


def _parse_yaml(path: Path, content: bytes, problems: list[str]) -> Any:
    try:
        return yaml.load(content.decode("utf-8-sig"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        problems.append(f"{path}: not UTF-8 text: byte {exc.start}")
    except yaml.MarkedYAMLError as exc:
        # The problem only, never the snippet: the line may hold a secret.
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problems.append(f"{path}: {where}invalid YAML: {exc.problem or exc.context}")
    except yaml.YAMLError as exc:
        problems.append(f"{path}: invalid YAML: {type(exc).__name__}")
    return None


def _expander(env: Mapping[str, str]) -> Callable[[str], str]:
    """${VAR} expansion for the reader, its problems phrased for a config file."""

    def expand(value: str) -> str:
        try:
            return expand_env(value, env)
        except UnsetVariable as exc:
            name = exc.name
            raise NotExpanded(
                f"environment variable {name} is not set", f"{name} set, or a default as in ${{{name}:-value}}"
            ) from None
        except ValueError as exc:
            raise NotExpanded(str(exc), "${NAME} or ${NAME:-default}; write $$ for a literal $") from None

    return expand


# ---- sections ----------------------------------------------------------------------------

_TOP_KEYS = ("server", "proxy", "discovery", "model_aliases", "logging", "profiles_dir")
_ENDPOINT_KEYS = tuple(
    "url name type priority model_url health_check_url check_interval check_timeout slots headers".split()
)


def parse_config(
    data: Any, source: str, env: Mapping[str, str] | None = None, *, base_dir: str | Path | None = None
) -> Config:
    """Validate parsed YAML; raises ConfigError listing every problem. Relative paths resolve against base_dir."""
    env = os.environ if env is None else env
    base = Path.cwd() if base_dir is None else Path(base_dir)
    r = Checks(source, width=100, scrub=without_password, expand=_expander(env))
    top = r.mapping(data, "", _TOP_KEYS)
    profiles, profiles_ok = _profiles(r, top, base)
    config = Config(
        server=_server(r, top.get("server"), env, base),
        proxy=_proxy(r, top.get("proxy")),
        discovery=_discovery(r, top.get("discovery"), profiles if profiles_ok else None),
        model_aliases=_aliases(r, top.get("model_aliases"), "model_aliases"),
        logging=_logging(r, top.get("logging")),
        profiles=profiles,
        source=source,
    )
    r.done()
    return config


def _profiles(r: Checks, top: Mapping[Any, Any], base_dir: Path) -> tuple[Mapping[str, Profile], bool]:
    """The shipped profiles, overridden by name by those in `profiles_dir`."""
    expected = "a directory of profile *.yaml files"
    named = r.get(top, "profiles_dir", "", None, text, expected)
    profiles: dict[str, Profile] = {}
    problems: list[str] = []
    directories = [SHIPPED_PROFILES_DIR]
    if named is not None:
        directory = base_dir / Path(named).expanduser()
        if not directory.is_dir():
            r.bad("profiles_dir", "not a directory", str(directory), expected)
        elif directory.resolve() != SHIPPED_PROFILES_DIR.resolve():
            directories.append(directory)
    for directory in directories:
        profiles.update(_profiles_in(directory, problems))
    problems += prefix_conflicts(profiles)
    r.problems += problems
    return MappingProxyType(profiles), not problems


def _server(r: Checks, value: Any, env: Mapping[str, str], base_dir: Path) -> ServerConfig:
    d = ServerConfig()
    keys = ("host", "port", "request_limits", "shutdown_timeout", "auth", "rate_limits", "cors")
    m = r.mapping(value, "server", keys)
    limits = r.mapping(m.get("request_limits"), "server.request_limits", ("max_body_size",))
    return ServerConfig(
        host=r.get(m, "host", "server", d.host, text, "a host name or IP address"),
        port=r.get(m, "port", "server", d.port, integer(1, 65535), "an integer port from 1 to 65535"),
        max_body_size=r.get(
            limits, "max_body_size", "server.request_limits", d.max_body_size, size, f"{SIZE_EXPECTED}, above zero"
        ),
        shutdown_timeout=r.get(m, "shutdown_timeout", "server", d.shutdown_timeout, duration(0), DURATION_EXPECTED),
        auth=parse_auth(r, m.get("auth"), env, base_dir),
        rate_limits=parse_rate_limits(r, m.get("rate_limits")),
        cors=parse_cors(r, m.get("cors")),
    )


def _proxy(r: Checks, value: Any) -> ProxyConfig:
    d = ProxyConfig()
    keys = ("load_balancer", "connection_timeout", "response_timeout", "read_timeout", "header_timeout", "retry",
            "queue", "affinity")  # fmt: skip
    m = r.mapping(value, "proxy", keys)
    timeout = duration(0, exclusive=True)
    expected = f"{DURATION_EXPECTED}, above zero"
    retry = r.mapping(m.get("retry"), "proxy.retry", ("enabled", "max_attempts"))
    queue = r.mapping(m.get("queue"), "proxy.queue", ("max_size", "timeout"))
    affinity = r.mapping(m.get("affinity"), "proxy.affinity", ("enabled", "max_entries", "ttl", "hold"))
    q, a = QueueConfig(), AffinityConfig()
    return ProxyConfig(
        load_balancer=r.get(
            m, "load_balancer", "proxy", d.load_balancer, choice(BALANCERS), f"one of {', '.join(BALANCERS)}"
        ),
        connection_timeout=r.get(m, "connection_timeout", "proxy", d.connection_timeout, timeout, expected),
        response_timeout=r.get(m, "response_timeout", "proxy", d.response_timeout, timeout, expected),
        read_timeout=r.get(m, "read_timeout", "proxy", d.read_timeout, timeout, expected),
        header_timeout=r.get(m, "header_timeout", "proxy", d.header_timeout, timeout, expected),
        retry=RetryConfig(
            enabled=r.get(retry, "enabled", "proxy.retry", True, boolean, "true or false"),
            max_attempts=r.get(
                retry, "max_attempts", "proxy.retry", 0, integer(0), "an integer >= 0 (0: every candidate once)"
            ),
        ),
        queue=QueueConfig(
            max_size=r.get(queue, "max_size", "proxy.queue", q.max_size, integer(0),
                           "an integer >= 0 (0: no queue, 503 at once)"),
            timeout=r.get(queue, "timeout", "proxy.queue", q.timeout, timeout, expected),
        ),
        affinity=AffinityConfig(
            enabled=r.get(affinity, "enabled", "proxy.affinity", a.enabled, boolean, "true or false"),
            max_entries=r.get(affinity, "max_entries", "proxy.affinity", a.max_entries, integer(1), "an integer >= 1"),
            ttl=r.get(affinity, "ttl", "proxy.affinity", a.ttl, timeout, expected),
            hold=r.get(affinity, "hold", "proxy.affinity", a.hold, duration(0), f"{DURATION_EXPECTED} (0: off)"),
        ),
    )  # fmt: skip


def _logging(r: Checks, value: Any) -> LoggingConfig:
    m = r.mapping(value, "logging", ("level", "format"))
    return LoggingConfig(
        level=r.get(m, "level", "logging", "info", choice(LOG_LEVELS), f"one of {', '.join(LOG_LEVELS)}"),
        format=r.get(m, "format", "logging", "json", choice(LOG_FORMATS), f"one of {', '.join(LOG_FORMATS)}"),
    )


def _discovery(r: Checks, value: Any, profiles: Mapping[str, Profile] | None) -> DiscoveryConfig:
    m = r.mapping(value, "discovery", ("type", "static", "model_discovery", "slots_interval"))
    r.get(m, "type", "discovery", "static", choice(("static",)), "static (the only discovery type)")
    static = r.mapping(m.get("static"), "discovery.static", ("endpoints",))
    found = r.mapping(m.get("model_discovery"), "discovery.model_discovery", ("interval",))
    above_zero = f"{DURATION_EXPECTED}, above zero"
    interval = r.get(found, "interval", "discovery.model_discovery", 300.0, duration(0, exclusive=True), above_zero)
    # llama-server answers /slots on its main loop: polling it much faster slowed generation ~30x.
    slots_interval = r.get(m, "slots_interval", "discovery", 2.0, duration(1.0), f"{DURATION_EXPECTED}, at least 1s")
    items = static.get("endpoints")
    path = "discovery.static.endpoints"
    if items is not None and not isinstance(items, list):
        r.bad(path, "wrong type", items, "a list of endpoints")
        items = None
    names, urls = _Unique(r, "name"), _Unique(r, "URL")
    endpoints = [_endpoint(r, item, f"{path}[{i}]", profiles, names, urls) for i, item in enumerate(items or [])]
    return DiscoveryConfig(tuple(e for e in endpoints if e is not None), interval, slots_interval)


def _endpoint(
    r: Checks, item: Any, path: str, profiles: Mapping[str, Profile] | None, names: _Unique, urls: _Unique
) -> EndpointConfig | None:
    m = r.mapping(item, path, _ENDPOINT_KEYS)
    if not isinstance(item, Mapping):
        return None
    d = EndpointConfig(name="", url="")
    name = r.require(m, "name", path, text, "a unique, non-empty name")
    url = r.require(m, "url", path, base_url, "an http:// or https:// URL with a host, such as http://127.0.0.1:8080")
    if not isinstance(name, Bad):
        names.claim(name, key_path(path, "name"), name)
    if not isinstance(url, Bad):
        urls.claim(url_key(url), key_path(path, "url"), url)
    kind = r.get(m, "type", path, d.type, text, "a profile name")
    profile = None
    if profiles is not None:
        profile = profiles.get(kind)
        if profile is None:
            hint = difflib.get_close_matches(kind, list(profiles), n=1)
            problem = f"unknown endpoint type (did you mean {hint[0]}?)" if hint else "unknown endpoint type"
            loaded = ", ".join(sorted(profiles)) or "none loaded"
            r.bad(key_path(path, "type"), problem, kind, f"a loaded profile: {loaded}")
    interval = r.get(
        m, "check_interval", path, d.check_interval, duration(0.1), f"{DURATION_EXPECTED}, at least 100ms"
    )
    timeout = min(d.check_timeout, interval / 2)  # a short check_interval alone stays valid
    if "check_timeout" in m:
        here = key_path(path, "check_timeout")
        given = r.check(m["check_timeout"], here, duration(0, exclusive=True), f"{DURATION_EXPECTED}, above zero")
        if not isinstance(given, Bad) and given >= interval:
            below = f"a duration below check_interval ({interval:g}s)"
            r.bad(here, "not less than check_interval", m["check_timeout"], below)
        elif not isinstance(given, Bad):
            timeout = given
    expected_target = "a path such as /health (joined to url) or an absolute http(s) URL"
    model_url = r.get(m, "model_url", path, None, target_url, expected_target)
    health_url = r.get(m, "health_check_url", path, None, target_url, expected_target)
    priority = r.get(m, "priority", path, d.priority, integer(0), "an integer >= 0 (higher is preferred)")
    slots = r.get(m, "slots", path, None, integer(1), "an integer >= 1 (llama-server's -np)")
    headers = _headers(r, m.get("headers"), key_path(path, "headers"))
    if isinstance(name, Bad) or isinstance(url, Bad):
        return None
    if profile is not None:
        model_url = model_url or profile.models_path
        health_url = health_url or profile.health_path
    return EndpointConfig(
        name=name,
        url=url,
        type=kind,
        priority=priority,
        model_url=join_url(url, model_url) if model_url else None,
        health_check_url=join_url(url, health_url) if health_url else None,
        check_interval=interval,
        check_timeout=timeout,
        slots=slots,
        headers=headers,
    )


def _headers(r: Checks, value: Any, path: str) -> Mapping[str, str]:
    expected = "a mapping of header name -> string value"
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        r.bad(path, "wrong type", value, expected, secret=True)
        return MappingProxyType({})
    headers: dict[str, str] = {}
    seen: set[str] = set()
    for name, raw in value.items():
        here = key_path(path, name)
        if not isinstance(name, str) or not HEADER_NAME_PATTERN.fullmatch(name):
            r.bad(here, "bad header name", name, "an HTTP header name (letters, digits and !#$%&'*+.^_`|~-)")
        elif name.lower() in MANAGED_HEADERS:
            r.bad(here, "header set by olla itself", name, f"a header other than {', '.join(sorted(MANAGED_HEADERS))}")
        elif name.lower() in seen:
            r.bad(here, "duplicate header (names are case-insensitive)", name, "each header once")
        else:
            seen.add(name.lower())
            checked = r.check(raw, here, header_value, "a non-empty string on one line", secret=True)
            if not isinstance(checked, Bad):
                headers[name] = checked
    return MappingProxyType(headers)


class _Unique:
    """Reports the second and later endpoints that claim the same name or URL."""

    def __init__(self, r: Checks, what: str) -> None:
        self.r, self.what = r, what
        self.first: dict[Hashable, str] = {}

    def claim(self, key: Hashable, path: str, got: str) -> None:
        first = self.first.setdefault(key, path)
        if first != path:
            self.r.bad(path, f"duplicate {self.what} (also at {first})", got, f"a {self.what} no other endpoint uses")


def _aliases(r: Checks, value: Any, path: str) -> Mapping[str, tuple[str, ...]]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        r.bad(path, "wrong type", value, "a mapping of alias -> list of model ids")
        return MappingProxyType({})
    aliases: dict[str, tuple[str, ...]] = {}
    for alias, ids in value.items():
        here = key_path(path, alias)
        if not isinstance(alias, str) or not alias.strip() or alias != alias.strip():
            r.bad(here, "bad alias name", alias, "a non-empty string without surrounding whitespace")
            continue
        if not isinstance(ids, list) or not ids:
            problem = "empty list" if isinstance(ids, list) else "wrong type"
            r.bad(here, problem, ids, "a non-empty list of model ids")
            continue
        expected = "a non-empty model id without surrounding whitespace"
        checked = [r.check(model, f"{here}[{i}]", text, expected) for i, model in enumerate(ids)]
        good = [m for m in checked if not isinstance(m, Bad)]
        for i, model in enumerate(good):
            if model in good[:i]:
                r.bad(here, "model listed twice", model, "each model id once")
        aliases[alias] = tuple(dict.fromkeys(good))
    return MappingProxyType(aliases)
