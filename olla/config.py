"""YAML -> frozen dataclasses, validated once; the only module that imports yaml.

`load_config` reads a file; `parse_config` validates already-parsed data. Every
problem is collected, then one `ConfigError` lists them all, each as
`<file>: <key.path[index]>: <problem>: got <value>; expected <what>`.
Header values are secrets and are never echoed. What a single value may look like
(durations, sizes, `${VAR}`, URLs) is `olla.values`; this module knows the keys.

Profiles are read here too (they are YAML) and validated by the pure
`olla.profiles.parse_profile`, because endpoint `type` must name a loaded profile.
"""

from __future__ import annotations

import difflib
import enum
import functools
import os
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from olla.errors import ConfigError
from olla.profiles import HEADER_NAME_PATTERN, Profile, parse_profile, prefix_conflicts
from olla.values import (
    DURATION_EXPECTED,
    SIZE_EXPECTED,
    Convert,
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
BALANCERS = ("priority", "round-robin", "least-connections")  # names in olla.balancer.BALANCERS
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


@dataclass(frozen=True)
class RetryConfig:
    enabled: bool = True
    max_attempts: int = 0  # 0: every candidate once


@dataclass(frozen=True)
class ProxyConfig:
    load_balancer: str = "least-connections"
    connection_timeout: float = 10.0
    response_timeout: float = 900.0
    read_timeout: float = 600.0
    retry: RetryConfig = RetryConfig()


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
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False, repr=False)  # secrets


@dataclass(frozen=True)
class DiscoveryConfig:
    endpoints: tuple[EndpointConfig, ...] = ()
    model_discovery_interval: float = 300.0


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
    data = _read_yaml(Path(path), problems)
    if problems:
        raise ConfigError(problems)
    return parse_config(data, str(path), env, base_dir=Path(path).parent)


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
    try:
        text = path.read_bytes().decode("utf-8-sig")
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror or exc}")
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


# ---- the reader: typed getters that collect problems ---------------------------------------

T = TypeVar("T")


class _Bad(enum.Enum):
    """What a check returns after recording a problem."""

    BAD = 0


_BAD = _Bad.BAD


class _Reader:
    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env
        self.problems: list[str] = []

    def bad(self, path: str, problem: str, got: Any, expected: str, *, secret: bool = False) -> None:
        self.problems.append(
            f"{self.source}: {path or '(document)'}: {problem}: got {_show(got, secret)}; expected {expected}"
        )

    def mapping(self, value: Any, path: str, keys: tuple[str, ...]) -> Mapping[Any, Any]:
        """A section: None is empty; unknown keys are reported with the closest known one."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.bad(path, "wrong type", value, f"a mapping with keys {', '.join(keys)}")
            return {}
        for key in value:
            if key not in keys:
                hint = difflib.get_close_matches(str(key), keys, n=1)
                problem = f"unknown key (did you mean {hint[0]}?)" if hint else "unknown key"
                self.bad(_key(path, key), problem, key, f"one of {', '.join(keys)}")
        return value

    def check(self, value: Any, path: str, convert: Convert[T], expected: str, *, secret: bool = False) -> T | _Bad:
        """`convert(value)` after ${VAR} expansion, or _BAD with the problem recorded."""
        if isinstance(value, str):
            try:
                value = expand_env(value, self.env)
            except UnsetVariable as exc:
                self.bad(
                    path,
                    f"environment variable {exc.name} is not set",
                    value,
                    f"{exc.name} set, or a default as in ${{{exc.name}:-value}}",
                    secret=secret,
                )
                return _BAD
            except ValueError as exc:
                self.bad(path, str(exc), value, "${NAME} or ${NAME:-default}; write $$ for a literal $", secret=secret)
                return _BAD
        try:
            return convert(value)
        except ValueError as exc:
            self.bad(path, str(exc) or "bad value", value, expected, secret=secret)
            return _BAD

    def get(self, data: Mapping[Any, Any], key: str, path: str, default: T, convert: Convert[T], expected: str) -> T:
        """data[key] checked; the default when it is absent or bad (the problem is recorded)."""
        if key not in data:
            return default
        result = self.check(data[key], _key(path, key), convert, expected)
        return default if isinstance(result, _Bad) else result

    def require(self, data: Mapping[Any, Any], key: str, path: str, convert: Convert[T], expected: str) -> T | _Bad:
        if key not in data:
            self.bad(_key(path, key), "missing required key", _Shown("nothing"), expected)
            return _BAD
        return self.check(data[key], _key(path, key), convert, expected)


class _Shown(str):
    """Printed as is, not through repr."""


def _show(value: Any, secret: bool) -> str:
    if secret:
        return "<redacted>"
    if isinstance(value, _Shown):
        return str(value)
    text = repr(without_password(str(value)) if isinstance(value, str) else value)
    return text if len(text) <= 100 else text[:97] + "..."


def _key(path: str, key: Any) -> str:
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


# ---- sections ----------------------------------------------------------------------------

_TOP_KEYS = ("server", "proxy", "discovery", "model_aliases", "logging", "profiles_dir")
_ENDPOINT_KEYS = tuple("url name type priority model_url health_check_url check_interval check_timeout headers".split())


def parse_config(
    data: Any, source: str, env: Mapping[str, str] | None = None, *, base_dir: str | Path | None = None
) -> Config:
    """Validate parsed YAML; raises ConfigError listing every problem. Relative paths resolve against base_dir."""
    r = _Reader(source, os.environ if env is None else env)
    top = r.mapping(data, "", _TOP_KEYS)
    profiles, profiles_ok = _profiles(r, top, Path.cwd() if base_dir is None else Path(base_dir))
    config = Config(
        server=_server(r, top.get("server")),
        proxy=_proxy(r, top.get("proxy")),
        discovery=_discovery(r, top.get("discovery"), profiles if profiles_ok else None),
        model_aliases=_aliases(r, top.get("model_aliases"), "model_aliases"),
        logging=_logging(r, top.get("logging")),
        profiles=profiles,
        source=source,
    )
    if r.problems:
        raise ConfigError(r.problems)
    return config


def _profiles(r: _Reader, top: Mapping[Any, Any], base_dir: Path) -> tuple[Mapping[str, Profile], bool]:
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


def _server(r: _Reader, value: Any) -> ServerConfig:
    d = ServerConfig()
    m = r.mapping(value, "server", ("host", "port", "request_limits", "shutdown_timeout"))
    limits = r.mapping(m.get("request_limits"), "server.request_limits", ("max_body_size",))
    return ServerConfig(
        host=r.get(m, "host", "server", d.host, text, "a host name or IP address"),
        port=r.get(m, "port", "server", d.port, integer(1, 65535), "an integer port from 1 to 65535"),
        max_body_size=r.get(
            limits, "max_body_size", "server.request_limits", d.max_body_size, size, f"{SIZE_EXPECTED}, above zero"
        ),
        shutdown_timeout=r.get(m, "shutdown_timeout", "server", d.shutdown_timeout, duration(0), DURATION_EXPECTED),
    )


def _proxy(r: _Reader, value: Any) -> ProxyConfig:
    d = ProxyConfig()
    m = r.mapping(value, "proxy", ("load_balancer", "connection_timeout", "response_timeout", "read_timeout", "retry"))
    timeout = duration(0, exclusive=True)
    expected = f"{DURATION_EXPECTED}, above zero"
    retry = r.mapping(m.get("retry"), "proxy.retry", ("enabled", "max_attempts"))
    return ProxyConfig(
        load_balancer=r.get(
            m, "load_balancer", "proxy", d.load_balancer, choice(BALANCERS), f"one of {', '.join(BALANCERS)}"
        ),
        connection_timeout=r.get(m, "connection_timeout", "proxy", d.connection_timeout, timeout, expected),
        response_timeout=r.get(m, "response_timeout", "proxy", d.response_timeout, timeout, expected),
        read_timeout=r.get(m, "read_timeout", "proxy", d.read_timeout, timeout, expected),
        retry=RetryConfig(
            enabled=r.get(retry, "enabled", "proxy.retry", True, boolean, "true or false"),
            max_attempts=r.get(
                retry, "max_attempts", "proxy.retry", 0, integer(0), "an integer >= 0 (0: every candidate once)"
            ),
        ),
    )


def _logging(r: _Reader, value: Any) -> LoggingConfig:
    m = r.mapping(value, "logging", ("level", "format"))
    return LoggingConfig(
        level=r.get(m, "level", "logging", "info", choice(LOG_LEVELS), f"one of {', '.join(LOG_LEVELS)}"),
        format=r.get(m, "format", "logging", "json", choice(LOG_FORMATS), f"one of {', '.join(LOG_FORMATS)}"),
    )


def _discovery(r: _Reader, value: Any, profiles: Mapping[str, Profile] | None) -> DiscoveryConfig:
    m = r.mapping(value, "discovery", ("type", "static", "model_discovery"))
    r.get(m, "type", "discovery", "static", choice(("static",)), "static (the only discovery type)")
    static = r.mapping(m.get("static"), "discovery.static", ("endpoints",))
    found = r.mapping(m.get("model_discovery"), "discovery.model_discovery", ("interval",))
    above_zero = f"{DURATION_EXPECTED}, above zero"
    interval = r.get(found, "interval", "discovery.model_discovery", 300.0, duration(0, exclusive=True), above_zero)
    items = static.get("endpoints")
    path = "discovery.static.endpoints"
    if items is not None and not isinstance(items, list):
        r.bad(path, "wrong type", items, "a list of endpoints")
        items = None
    names, urls = _Unique(r, "name"), _Unique(r, "URL")
    endpoints = [_endpoint(r, item, f"{path}[{i}]", profiles, names, urls) for i, item in enumerate(items or [])]
    return DiscoveryConfig(tuple(e for e in endpoints if e is not None), interval)


def _endpoint(
    r: _Reader, item: Any, path: str, profiles: Mapping[str, Profile] | None, names: _Unique, urls: _Unique
) -> EndpointConfig | None:
    m = r.mapping(item, path, _ENDPOINT_KEYS)
    if not isinstance(item, Mapping):
        return None
    d = EndpointConfig(name="", url="")
    name = r.require(m, "name", path, text, "a unique, non-empty name")
    url = r.require(m, "url", path, base_url, "an http:// or https:// URL with a host, such as http://127.0.0.1:8080")
    if not isinstance(name, _Bad):
        names.claim(name, _key(path, "name"), name)
    if not isinstance(url, _Bad):
        urls.claim(url_key(url), _key(path, "url"), url)
    kind = r.get(m, "type", path, d.type, text, "a profile name")
    profile = None
    if profiles is not None:
        profile = profiles.get(kind)
        if profile is None:
            hint = difflib.get_close_matches(kind, list(profiles), n=1)
            problem = f"unknown endpoint type (did you mean {hint[0]}?)" if hint else "unknown endpoint type"
            loaded = ", ".join(sorted(profiles)) or "none loaded"
            r.bad(_key(path, "type"), problem, kind, f"a loaded profile: {loaded}")
    interval = r.get(
        m, "check_interval", path, d.check_interval, duration(0.1), f"{DURATION_EXPECTED}, at least 100ms"
    )
    timeout = min(d.check_timeout, interval / 2)  # a short check_interval alone stays valid
    if "check_timeout" in m:
        here = _key(path, "check_timeout")
        given = r.check(m["check_timeout"], here, duration(0, exclusive=True), f"{DURATION_EXPECTED}, above zero")
        if not isinstance(given, _Bad) and given >= interval:
            below = f"a duration below check_interval ({interval:g}s)"
            r.bad(here, "not less than check_interval", m["check_timeout"], below)
        elif not isinstance(given, _Bad):
            timeout = given
    expected_target = "a path such as /health (joined to url) or an absolute http(s) URL"
    model_url = r.get(m, "model_url", path, None, target_url, expected_target)
    health_url = r.get(m, "health_check_url", path, None, target_url, expected_target)
    priority = r.get(m, "priority", path, d.priority, integer(0), "an integer >= 0 (higher is preferred)")
    headers = _headers(r, m.get("headers"), _key(path, "headers"))
    if isinstance(name, _Bad) or isinstance(url, _Bad):
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
        headers=headers,
    )


def _headers(r: _Reader, value: Any, path: str) -> Mapping[str, str]:
    expected = "a mapping of header name -> string value"
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        r.bad(path, "wrong type", value, expected, secret=True)
        return MappingProxyType({})
    headers: dict[str, str] = {}
    seen: set[str] = set()
    for name, raw in value.items():
        here = _key(path, name)
        if not isinstance(name, str) or not HEADER_NAME_PATTERN.fullmatch(name):
            r.bad(here, "bad header name", name, "an HTTP header name (letters, digits and !#$%&'*+.^_`|~-)")
        elif name.lower() in MANAGED_HEADERS:
            r.bad(here, "header set by olla itself", name, f"a header other than {', '.join(sorted(MANAGED_HEADERS))}")
        elif name.lower() in seen:
            r.bad(here, "duplicate header (names are case-insensitive)", name, "each header once")
        else:
            seen.add(name.lower())
            checked = r.check(raw, here, header_value, "a non-empty string on one line", secret=True)
            if not isinstance(checked, _Bad):
                headers[name] = checked
    return MappingProxyType(headers)


class _Unique:
    """Reports the second and later endpoints that claim the same name or URL."""

    def __init__(self, r: _Reader, what: str) -> None:
        self.r, self.what = r, what
        self.first: dict[Hashable, str] = {}

    def claim(self, key: Hashable, path: str, got: str) -> None:
        first = self.first.setdefault(key, path)
        if first != path:
            self.r.bad(path, f"duplicate {self.what} (also at {first})", got, f"a {self.what} no other endpoint uses")


def _aliases(r: _Reader, value: Any, path: str) -> Mapping[str, tuple[str, ...]]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        r.bad(path, "wrong type", value, "a mapping of alias -> list of model ids")
        return MappingProxyType({})
    aliases: dict[str, tuple[str, ...]] = {}
    for alias, ids in value.items():
        here = _key(path, alias)
        if not isinstance(alias, str) or not alias.strip() or alias != alias.strip():
            r.bad(here, "bad alias name", alias, "a non-empty string without surrounding whitespace")
            continue
        if not isinstance(ids, list) or not ids:
            problem = "empty list" if isinstance(ids, list) else "wrong type"
            r.bad(here, problem, ids, "a non-empty list of model ids")
            continue
        expected = "a non-empty model id without surrounding whitespace"
        checked = [r.check(model, f"{here}[{i}]", text, expected) for i, model in enumerate(ids)]
        good = [m for m in checked if not isinstance(m, _Bad)]
        for i, model in enumerate(good):
            if model in good[:i]:
                r.bad(here, "model listed twice", model, "each model id once")
        aliases[alias] = tuple(dict.fromkeys(good))
    return MappingProxyType(aliases)
