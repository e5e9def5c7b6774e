"""Profiles: what a kind of endpoint speaks (prefixes, forwarded routes, health and discovery paths).

A profile file (`profiles/*.yaml`) becomes a frozen `Profile` through `parse_profile`.
This module is a pure leaf that never reads a file: `config.py` is the only module
that imports yaml, and it needs `Profile` to check each endpoint's `type`. So
`config.py` reads the profile files and calls `parse_profile`, and the imports run
config -> profiles -> checks -> errors. Profiles therefore sit *below* config, not beside it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from olla.checks import Bad, Checks, key_path
from olla.errors import ConfigError

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HEADER_NAME_PATTERN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PATH_PATTERN = re.compile(r"/[^\s#]*")


@dataclass(frozen=True)
class Route:
    """One forwarded path; `model_from_body` means the model is read from the JSON body (or the model header)."""

    path: str
    methods: frozenset[str]
    takes_slot: bool = False
    model_from_body: bool = True


@dataclass(frozen=True)
class Profile:
    name: str
    prefixes: tuple[str, ...]  # only the enabled ones
    routes: Mapping[str, Route] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    health_path: str = "/health"
    models_path: str = "/v1/models"
    props_path: str = "/props"
    slots_path: str = "/slots"
    metrics_path: str = "/metrics"
    model_field: str = "model"
    model_header: str = "X-Olla-Model"
    default_slots: int = 4  # slots assumed for an endpoint that reports none and configures none
    version: str = "1.0"
    description: str = ""
    source: str = "<code>"

    def route(self, path: str) -> Route | None:
        return self.routes.get(path)


_TOP_KEYS = ("name", "version", "description", "default_slots", "routing", "api", "request")
_ROUTING_KEYS = ("prefixes",)
_PREFIX_KEYS = ("name", "enabled")
_PREFIX_EXPECTED = "a prefix of letters, digits, '.', '_' or '-'"
_ROUTE_KEYS = ("methods", "takes_slot", "model_from_body")
_REQUEST_KEYS = ("model_field", "model_header")
# Keys of Go Olla's profile format whose meaning lives on under another name here.
_RENAMED = {"paths": "routes", "model_field_paths": "model_field"}
_API_FIELDS = {
    "health_check_path": "health_path",
    "model_discovery_path": "models_path",
    "props_path": "props_path",
    "slots_path": "slots_path",
    "metrics_path": "metrics_path",
}
_API_KEYS = (*_API_FIELDS, "routes")


def parse_profile(data: Any, source: str) -> Profile:
    """Validate one profile document; raises ConfigError listing every problem in it."""
    check = Checks(source)
    top = check.mapping(data, "", _TOP_KEYS)
    if not isinstance(data, Mapping):
        raise ConfigError(check.problems)
    name = check.require(top, "name", "", _string(NAME_PATTERN), "a name of letters, digits, '.', '_' or '-'")
    version = top.get("version", "1.0")
    if isinstance(version, bool) or not isinstance(version, (str, int, float)):
        check.bad("version", "wrong type", version, "a version string such as '1.0'")
    description = check.get(top, "description", "", "", _string(None), "a string")
    default_slots = check.get(top, "default_slots", "", Profile.default_slots, _positive, "an integer >= 1")

    routing = check.mapping(top.get("routing"), "routing", _ROUTING_KEYS)
    prefixes = _prefixes(check, routing.get("prefixes"), "routing.prefixes")

    api = check.mapping(top.get("api"), "api", _API_KEYS, _RENAMED)
    paths = {
        attr: check.get(api, key, "api", getattr(Profile, attr), _string(_PATH_PATTERN), "a path starting with '/'")
        for key, attr in _API_FIELDS.items()
    }
    routes = _routes(check, api.get("routes"), "api.routes")

    request = check.mapping(top.get("request"), "request", _REQUEST_KEYS, _RENAMED)
    model_field = check.get(request, "model_field", "request", Profile.model_field, _string(None), "a JSON field name")
    model_header = check.get(
        request, "model_header", "request", Profile.model_header, _string(HEADER_NAME_PATTERN), "an HTTP header name"
    )

    check.done()
    return Profile(
        name=str(name),
        prefixes=prefixes,
        routes=MappingProxyType(routes),
        model_field=str(model_field),
        model_header=str(model_header),
        default_slots=int(default_slots),
        version=str(version),
        description=str(description),
        source=source,
        **{attr: str(value) for attr, value in paths.items()},
    )


def _positive(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("not an integer >= 1")
    return value


def prefix_conflicts(profiles: Mapping[str, Profile]) -> list[str]:
    """Problems for enabled prefixes claimed by more than one profile."""
    owner: dict[str, Profile] = {}
    problems = []
    for profile in profiles.values():
        for prefix in profile.prefixes:
            other = owner.setdefault(prefix, profile)
            if other is not profile:
                problems.append(
                    f"{profile.source}: routing.prefixes: prefix already enabled by profile "
                    f"{other.name!r} ({other.source}): got {prefix!r}; expected a prefix no other profile enables"
                )
    return problems


def _prefixes(check: Checks, value: Any, path: str) -> tuple[str, ...]:
    expected = "a list of prefix names or {name, enabled} mappings"
    if not isinstance(value, list) or not value:
        check.absent(path, value, expected)
        return ()
    enabled: list[str] = []
    seen: set[str] = set()
    before = len(check.problems)
    for index, item in enumerate(value):
        here = f"{path}[{index}]"
        if isinstance(item, Mapping):
            entry = check.mapping(item, here, _PREFIX_KEYS)
            name = check.require(entry, "name", here, _string(NAME_PATTERN), _PREFIX_EXPECTED)
            on = entry.get("enabled", True)
            if not isinstance(on, bool):
                check.bad(f"{here}.enabled", "wrong type", on, "true or false")
        elif isinstance(item, str) and NAME_PATTERN.fullmatch(item):
            name, on = item, True
        else:
            check.bad(here, "bad prefix", item, f"{_PREFIX_EXPECTED}, or a {{name, enabled}} mapping")
            continue
        if isinstance(name, Bad):
            continue
        if name in seen:
            check.bad(here, "duplicate prefix", name, "each prefix listed once")
        seen.add(name)
        if on is True:
            enabled.append(name)
    if not enabled and len(check.problems) == before:
        check.bad(path, "no enabled prefix", value, "at least one prefix with enabled: true")
    return tuple(enabled)


def _routes(check: Checks, value: Any, path: str) -> dict[str, Route]:
    expected = "a mapping of path -> {methods, takes_slot, model_from_body}"
    if not isinstance(value, Mapping) or not value:
        check.absent(path, value, expected)
        return {}
    routes: dict[str, Route] = {}
    for route_path, spec in value.items():
        here = key_path(path, route_path)
        if not isinstance(route_path, str) or not _PATH_PATTERN.fullmatch(route_path) or "?" in route_path:
            check.bad(here, "bad route path", route_path, "a path starting with '/', without query or spaces")
            continue
        entry = check.mapping(spec, here, _ROUTE_KEYS)
        methods = _methods(check, entry.get("methods"), f"{here}.methods")
        flags = {}
        for flag, default in (("takes_slot", False), ("model_from_body", True)):
            flags[flag] = entry.get(flag, default)
            if not isinstance(flags[flag], bool):
                check.bad(f"{here}.{flag}", "wrong type", flags[flag], "true or false")
        routes[route_path] = Route(route_path, methods, flags["takes_slot"] is True, flags["model_from_body"] is True)
    return routes


def _methods(check: Checks, value: Any, path: str) -> frozenset[str]:
    expected = f"a non-empty list of {', '.join(sorted(HTTP_METHODS))}"
    if not isinstance(value, list) or not value:
        check.absent(path, value, expected)
        return frozenset()
    methods = set()
    for index, method in enumerate(value):
        if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
            check.bad(f"{path}[{index}]", "unknown HTTP method", method, expected)
        else:
            methods.add(method.upper())
    return frozenset(methods)


def _string(pattern: re.Pattern[str] | None) -> Callable[[Any], str]:
    """A converter for Checks: a string, matching `pattern` in full when there is one."""

    def convert(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("wrong type")
        if pattern is not None and not pattern.fullmatch(value):
            raise ValueError("bad value")
        return value

    return convert
