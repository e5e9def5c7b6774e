"""YAML -> frozen dataclasses, validated once; the only module that imports yaml.

`load_config` reads a file; `parse_config` validates already-parsed data. Every
problem is collected (`olla.checks`), then one `ConfigError` lists them all, each as
`<file>: <key.path[index]>: <problem>: got <value>; expected <what>`.
Header values and API keys are secrets and are never echoed. What a single value may
look like (durations, sizes, `${VAR}`, URLs) is `olla.values`; this module knows the keys,
except those of `server.auth`, `server.rate_limits` and `server.cors` (`olla.admission_config`),
`proxy` (`olla.proxy_config`) and `discovery` (`olla.discovery_config`); their dataclasses
are re-exported here, so callers import every config class from this module.

Profiles are read here too (they are YAML) and validated by the pure
`olla.profiles.parse_profile`, because endpoint `type` must name a loaded profile.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from olla.admission_config import (
    AuthConfig,
    CorsConfig,
    RateLimitConfig,
    parse_auth,
    parse_cors,
    parse_rate_limits,
)
from olla.checks import Bad, Checks, NotExpanded, key_path
from olla.discovery_config import (
    MANAGED_HEADERS,
    DiscoveryConfig,
    EndpointConfig,
    parse_discovery,
)
from olla.errors import ConfigError
from olla.profiles import Profile, parse_profile, prefix_conflicts
from olla.proxy_config import (
    BALANCERS,
    AffinityConfig,
    ProxyConfig,
    QueueConfig,
    RetryConfig,
    parse_proxy,
)
from olla.values import (
    DURATION_EXPECTED,
    SIZE_EXPECTED,
    UnsetVariable,
    choice,
    duration,
    expand_env,
    integer,
    join_url,
    parse_duration,
    parse_size,
    size,
    text,
    without_password,
)

# Re-exported ones too: callers import the value grammar and every section's dataclasses from here.
__all__ = [
    "BALANCERS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MANAGED_HEADERS",
    "SHIPPED_PROFILES_DIR",
    "AffinityConfig",
    "Config",
    "DiscoveryConfig",
    "EndpointConfig",
    "LoggingConfig",
    "ProxyConfig",
    "QueueConfig",
    "RetryConfig",
    "ServerConfig",
    "default_profiles",
    "expand_env",
    "find_config_path",
    "join_url",
    "load_config",
    "load_profiles",
    "parse_config",
    "parse_duration",
    "parse_size",
]

SHIPPED_PROFILES_DIR = Path(__file__).parent / "profiles"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "localhost"
    port: int = 40114
    max_body_size: int = 100 * 1024 * 1024
    shutdown_timeout: float = 10.0
    # Frozen, so one shared default instance is safe (here and in Config); RUF009 cannot see that.
    auth: AuthConfig = AuthConfig()  # noqa: RUF009
    rate_limits: RateLimitConfig = RateLimitConfig()  # noqa: RUF009
    cors: CorsConfig = CorsConfig()  # noqa: RUF009


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
    proxy: ProxyConfig = ProxyConfig()  # noqa: RUF009
    discovery: DiscoveryConfig = DiscoveryConfig()  # noqa: RUF009
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
                        (
                            f"{named}: config file named by {origin} not found: got {str(path)!r}; "
                            "expected an existing YAML file"
                        )
                    ]
                )
            return path
    default = base / "config.yaml"
    if default.is_file():
        return default
    raise ConfigError(
        [
            (
                f"{default}: no config file: got no -c, no $OLLA_CONFIG and no {default.name}; "
                "expected one of them to name a file"
            )
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
        proxy=parse_proxy(r, top.get("proxy")),
        discovery=parse_discovery(r, top.get("discovery"), profiles if profiles_ok else None),
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


def _logging(r: Checks, value: Any) -> LoggingConfig:
    m = r.mapping(value, "logging", ("level", "format"))
    return LoggingConfig(
        level=r.get(m, "level", "logging", "info", choice(LOG_LEVELS), f"one of {', '.join(LOG_LEVELS)}"),
        format=r.get(m, "format", "logging", "json", choice(LOG_FORMATS), f"one of {', '.join(LOG_FORMATS)}"),
    )


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
