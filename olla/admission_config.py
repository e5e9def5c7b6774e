"""The `server.auth`, `server.rate_limits` and `server.cors` sections: their frozen dataclasses and checks.

Kept apart from `olla.config`, which calls `parse_auth`, `parse_rate_limits` and
`parse_cors` with its `Checks`, so every problem is reported with the rest of the
file's. API keys are secrets: a problem with one says where it is, never what it is.
Besides `server.auth.api_keys`, keys come from `$OPENAI_API_KEYS`
(`key_a:team_a,key_b:team_b,key_c`), read from the same environment as `${VAR}`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from olla.checks import Bad, Checks, Shown, key_path
from olla.clients import ANONYMOUS, IPNetwork, generated_client, parse_key_list
from olla.profiles import HEADER_NAME_PATTERN
from olla.values import DURATION_EXPECTED, boolean, duration, integer, text

T = TypeVar("T")
KEYS_VARIABLE = "OPENAI_API_KEYS"
DEFAULT_TRUSTED_PROXY_CIDRS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(c) for c in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
_KEY = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what a header carries unchanged
_CLIENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_METHOD = re.compile(r"[A-Za-z]+")
_ORIGIN = re.compile(r"(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?")
KEY_EXPECTED = "a non-empty key of visible ASCII characters, without spaces"
CLIENT_EXPECTED = f"a client id of letters, digits, '.', '_' or '-' (at most 64, not {ANONYMOUS!r})"
OFF = "an integer >= 0 (0: off)"


@dataclass(frozen=True)
class ApiKey:
    client: str
    key: str = field(repr=False)  # a secret


@dataclass(frozen=True)
class AuthConfig:
    api_keys: tuple[ApiKey, ...] = ()  # none: auth is off
    protect_status: bool = True  # with keys: /internal/status* and /metrics need one too

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys)


@dataclass(frozen=True)
class RateLimitConfig:
    global_requests_per_minute: int = 0  # 0: off
    per_ip_requests_per_minute: int = 0  # per client (by key), else per IP address
    health_requests_per_minute: int = 0  # per client or IP, on the status routes
    burst_size: int = 50
    trust_proxy_headers: bool = False
    trusted_proxy_cidrs: tuple[IPNetwork, ...] = DEFAULT_TRUSTED_PROXY_CIDRS
    max_buckets: int = 10_000  # per-caller buckets kept, per kind


@dataclass(frozen=True)
class CorsConfig:
    enabled: bool = False
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("GET", "POST", "OPTIONS")
    allowed_headers: tuple[str, ...] = ("*",)
    exposed_headers: tuple[str, ...] = ()  # besides olla's own X-Olla-*, X-RateLimit-* and Retry-After
    allow_credentials: bool = False
    max_age: int = 300  # seconds


# ---- converters ----------------------------------------------------------------------------


def api_key(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("wrong type")
    if not _KEY.fullmatch(value):
        raise ValueError("empty, or contains spaces or characters outside visible ASCII")
    return str(value)


def client_id(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("wrong type")
    if not _CLIENT.fullmatch(value):
        raise ValueError("bad client id")
    if value == ANONYMOUS:
        raise ValueError("reserved for requests without a client")
    return str(value)


def cidr(value: Any) -> IPNetwork:
    if not isinstance(value, str):
        raise ValueError("wrong type")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError("not a CIDR") from None


def origin(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("wrong type")
    if value == "*":
        return value
    match = _ORIGIN.fullmatch(value.lower())
    if match is None or (match.group(3) and not 0 < int(match.group(3)[1:]) < 65536):
        raise ValueError("not an origin")
    return match.group(0)


def method(value: Any) -> str:
    if not isinstance(value, str) or not _METHOD.fullmatch(value):
        raise ValueError("not an HTTP method")
    return value.upper()


def header_name(value: Any) -> str:
    if not isinstance(value, str) or not HEADER_NAME_PATTERN.fullmatch(value):
        raise ValueError("not a header name")
    return str(value)


def header_or_any(value: Any) -> str:
    return "*" if value == "*" else header_name(value)


# ---- sections ------------------------------------------------------------------------------


def parse_auth(r: Checks, value: Any, env: Mapping[str, str], base_dir: Path) -> AuthConfig:
    path = "server.auth"
    m = r.mapping(value, path, ("api_keys", "protect_status"))
    protect = r.get(m, "protect_status", path, AuthConfig.protect_status, boolean, "true or false")
    found: list[tuple[str, str, str | None]] = []  # (where, key, client or None)
    items = m.get("api_keys")
    here = key_path(path, "api_keys")
    if items is not None and not isinstance(items, list):
        r.bad(here, "wrong type", items, "a list of {key, client} or {key_file, client}", secret=True)
    for i, item in enumerate(items if isinstance(items, list) else []):
        entry = _configured_key(r, item, f"{here}[{i}]", base_dir)
        if entry is not None:
            found.append(entry)
    for i, (key, client) in enumerate(parse_key_list(env.get(KEYS_VARIABLE, ""))):
        where = f"${KEYS_VARIABLE}[{i}]"
        checked_key, checked_client = _direct(r, key, where, api_key, KEY_EXPECTED, True), None
        if client is not None:
            checked_client = _direct(r, client, where, client_id, CLIENT_EXPECTED, False)
        if not isinstance(checked_key, Bad) and not isinstance(checked_client, Bad):
            found.append((where, checked_key, checked_client))
    keys: list[ApiKey] = []
    first: dict[str, str] = {}
    for where, key, client in found:
        seen = first.setdefault(key, where)
        if seen != where:
            r.bad(where, f"duplicate key (also at {seen})", key, "each key once", secret=True)
            continue
        keys.append(ApiKey(client or generated_client(key), key))
    return AuthConfig(tuple(keys), protect)


def _configured_key(r: Checks, item: Any, path: str, base_dir: Path) -> tuple[str, str, str | None] | None:
    if not isinstance(item, Mapping):
        r.bad(path, "wrong type", item, "a mapping with key (or key_file) and client", secret=True)
        return None
    m = r.mapping(item, path, ("key", "key_file", "client"))
    client = r.get(m, "client", path, None, client_id, CLIENT_EXPECTED)
    if ("key" in m) == ("key_file" in m):
        r.bad(path, "give exactly one of key and key_file", Shown("both" if "key" in m else "neither"),
              "key: ${VAR} or key_file: PATH")  # fmt: skip
        return None
    if "key" in m:
        key = r.check(m["key"], key_path(path, "key"), api_key, KEY_EXPECTED, secret=True)
        return None if isinstance(key, Bad) else (path, key, client)
    where = key_path(path, "key_file")
    named = r.check(m["key_file"], where, text, "a path to a file holding one key")
    if isinstance(named, Bad):
        return None
    file = base_dir / Path(named).expanduser()
    try:
        content = file.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        r.bad(where, f"cannot read key file: {problem}", str(file), "a readable file holding one key")
        return None
    try:
        return path, api_key(content), client
    except ValueError as exc:
        r.bad(where, f"bad key in file: {exc}", str(file), f"a file holding {KEY_EXPECTED}")
        return None


def _direct(r: Checks, value: str, path: str, convert: Callable[[Any], T], expected: str, secret: bool) -> T | Bad:
    """A value checked without `${VAR}` expansion: it came from the environment already."""
    try:
        return convert(value)
    except ValueError as exc:
        r.bad(path, str(exc), value, expected, secret=secret)
        return Bad.BAD


def parse_rate_limits(r: Checks, value: Any) -> RateLimitConfig:
    path = "server.rate_limits"
    keys = ("global_requests_per_minute", "per_ip_requests_per_minute", "health_requests_per_minute",
            "burst_size", "trust_proxy_headers", "trusted_proxy_cidrs", "max_buckets")  # fmt: skip
    m = r.mapping(value, path, keys)
    d = RateLimitConfig()
    return RateLimitConfig(
        global_requests_per_minute=r.get(m, "global_requests_per_minute", path, 0, integer(0), OFF),
        per_ip_requests_per_minute=r.get(m, "per_ip_requests_per_minute", path, 0, integer(0), OFF),
        health_requests_per_minute=r.get(m, "health_requests_per_minute", path, 0, integer(0), OFF),
        burst_size=r.get(m, "burst_size", path, d.burst_size, integer(1), "an integer >= 1"),
        trust_proxy_headers=r.get(m, "trust_proxy_headers", path, d.trust_proxy_headers, boolean, "true or false"),
        trusted_proxy_cidrs=_list(r, m, "trusted_proxy_cidrs", path, d.trusted_proxy_cidrs, cidr,
                                  "a CIDR such as 10.0.0.0/8 or fd00::/8, or one IP address", empty_ok=True),
        max_buckets=r.get(m, "max_buckets", path, d.max_buckets, integer(1), "an integer >= 1"),
    )


def parse_cors(r: Checks, value: Any) -> CorsConfig:
    path = "server.cors"
    keys = ("enabled", "allowed_origins", "allowed_methods", "allowed_headers", "exposed_headers",
            "allow_credentials", "max_age")  # fmt: skip
    m = r.mapping(value, path, keys)
    d = CorsConfig()
    config = CorsConfig(
        enabled=r.get(m, "enabled", path, d.enabled, boolean, "true or false"),
        allowed_origins=_list(r, m, "allowed_origins", path, d.allowed_origins, origin,
                              "'*' or an origin such as https://chat.example.com (scheme, host and port only)"),
        allowed_methods=_list(r, m, "allowed_methods", path, d.allowed_methods, method, "an HTTP method such as POST"),
        allowed_headers=_list(r, m, "allowed_headers", path, d.allowed_headers, header_or_any,
                              "'*' or a header name", empty_ok=True),
        exposed_headers=_list(r, m, "exposed_headers", path, d.exposed_headers, header_name, "a header name",
                              empty_ok=True),
        allow_credentials=r.get(m, "allow_credentials", path, d.allow_credentials, boolean, "true or false"),
        max_age=round(r.get(m, "max_age", path, float(d.max_age), duration(0), f"{DURATION_EXPECTED}, >= 0")),
    )  # fmt: skip
    origins = config.allowed_origins
    if "*" in origins and len(origins) > 1:
        r.bad(key_path(path, "allowed_origins"), "'*' with other origins", list(origins), "'*' alone, or origins")
    elif "*" in origins and config.allow_credentials:
        # Browsers refuse credentials with `Access-Control-Allow-Origin: *`; echoing any origin instead would
        # hand every site the user's credentials.
        r.bad(key_path(path, "allow_credentials"), "credentials cannot be allowed for any origin ('*')", True,
              "false, or allowed_origins listing each origin")  # fmt: skip
    return config


def _list(
    r: Checks, m: Mapping[Any, Any], key: str, path: str, default: tuple[T, ...], convert: Callable[[Any], T],
    expected: str, *, empty_ok: bool = False,
) -> tuple[T, ...]:  # fmt: skip
    """A list of values, each checked; the default when absent, and what was good when some were bad."""
    if key not in m:
        return default
    here = key_path(path, key)
    items = m[key]
    if not isinstance(items, list) or (not items and not empty_ok):
        r.absent(here, items, f"a {'' if empty_ok else 'non-empty '}list, each {expected}")
        return default
    checked = [r.check(item, f"{here}[{i}]", convert, expected) for i, item in enumerate(items)]
    return tuple(dict.fromkeys(c for c in checked if not isinstance(c, Bad)))
