"""The `discovery` section: the static list of endpoints, their checks and headers, and discovery's pace.

Kept apart from `olla.config`, which calls `parse_discovery` with its `Checks` and the
loaded profiles (an endpoint's `type` must name one), so every problem is reported with
the rest of the file's. Header values are secrets: a problem with one says where it is,
never what it is.
"""

from __future__ import annotations

import difflib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from olla.checks import Bad, Checks, key_path
from olla.profiles import HEADER_NAME_PATTERN, Profile
from olla.values import (
    DURATION_EXPECTED,
    base_url,
    choice,
    duration,
    header_value,
    integer,
    join_url,
    target_url,
    text,
    url_key,
)

# Set by olla's client per request; a configured value would break the exchange.
MANAGED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade", "te"})
_ENDPOINT_KEYS = ("url", "name", "type", "priority", "model_url", "health_check_url", "check_interval",
                  "check_timeout", "slots", "headers")  # fmt: skip


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


def parse_discovery(r: Checks, value: Any, profiles: Mapping[str, Profile] | None) -> DiscoveryConfig:
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
