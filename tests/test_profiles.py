"""profiles.py and the shipped profiles: what is forwarded, and what a broken profile file says."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from olla.config import SHIPPED_PROFILES_DIR, default_profiles, load_profiles
from olla.errors import ConfigError
from olla.profiles import Profile, Route, parse_profile, prefix_conflicts

SLOT_ROUTES = {
    "/completion",
    "/v1/completions",
    "/v1/chat/completions",
    "/infill",
    "/embedding",
    "/v1/embeddings",
    "/rerank",
    "/v1/rerank",
    "/v1/messages",
}
OTHER_POST_ROUTES = {"/tokenize", "/detokenize", "/apply-template", "/v1/messages/count_tokens"}

MINIMAL: dict[str, Any] = {
    "name": "tiny",
    "routing": {"prefixes": ["tiny"]},
    "api": {"routes": {"/v1/models": {"methods": ["GET"], "model_from_body": False}}},
}


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_profile(data, "p.yaml")
    return caught.value.problems


def changed(**sections: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    data.update(sections)
    return data


# ---- the shipped llamacpp profile -----------------------------------------------------------


def test_shipped_profile_loads() -> None:
    profiles = load_profiles(SHIPPED_PROFILES_DIR)
    assert list(profiles) == ["llamacpp"]
    assert profiles == dict(default_profiles())


def test_package_ships_the_profiles_directory() -> None:
    link = Path(__file__).resolve().parent.parent / "olla" / "profiles"
    assert link.is_symlink() and (link / "llamacpp.yaml").is_file()
    assert link == SHIPPED_PROFILES_DIR


def test_llamacpp_prefixes_only_the_enabled_one() -> None:
    profile = default_profiles()["llamacpp"]
    assert profile.name == "llamacpp"
    assert profile.prefixes == ("llamacpp",)
    text = (SHIPPED_PROFILES_DIR / "llamacpp.yaml").read_text()
    assert "name: llama-cpp\n      enabled: false" in text and "name: llama_cpp\n      enabled: false" in text


def test_llamacpp_allowlist_and_methods() -> None:
    profile = default_profiles()["llamacpp"]
    assert set(profile.routes) == {"/v1/models"} | SLOT_ROUTES | OTHER_POST_ROUTES
    assert profile.route("/v1/models") == Route(
        "/v1/models", frozenset({"GET"}), takes_slot=False, model_from_body=False
    )
    for path in SLOT_ROUTES | OTHER_POST_ROUTES:
        route = profile.route(path)
        assert route is not None and route.methods == frozenset({"POST"}) and route.model_from_body, path
        assert route.takes_slot == (path in SLOT_ROUTES), path


def test_llamacpp_paths_and_model_location() -> None:
    profile = default_profiles()["llamacpp"]
    assert (profile.health_path, profile.models_path, profile.props_path, profile.slots_path, profile.metrics_path) == (
        "/health",
        "/v1/models",
        "/props",
        "/slots",
        "/metrics",
    )
    assert (profile.model_field, profile.model_header) == ("model", "X-Olla-Model")
    assert profile.version == "1.0"


@pytest.mark.parametrize(
    "path", ["/slots", "/props", "/metrics", "/health", "/v1/chat/completions/", "/slots/0", "/models/load"]
)
def test_paths_outside_the_allowlist_are_not_routes(path: str) -> None:
    assert default_profiles()["llamacpp"].route(path) is None


# ---- the format ---------------------------------------------------------------------------


def test_minimal_profile_takes_the_defaults() -> None:
    profile = parse_profile(MINIMAL, "p.yaml")
    assert profile == Profile(
        name="tiny",
        prefixes=("tiny",),
        routes={"/v1/models": Route("/v1/models", frozenset({"GET"}), False, False)},
        source="p.yaml",
    )
    assert (profile.health_path, profile.models_path, profile.model_field, profile.version) == (
        "/health",
        "/v1/models",
        "model",
        "1.0",
    )


def test_full_profile() -> None:
    data = {
        "name": "fork",
        "version": 2,
        "description": "a fork",
        "routing": {"prefixes": [{"name": "fork"}, {"name": "fork-off", "enabled": False}, "fk"]},
        "api": {
            "health_check_path": "/v1/health",
            "model_discovery_path": "/models",
            "props_path": "/p",
            "slots_path": "/slots?fail_on_no_slot=1",
            "metrics_path": "/m",
            "routes": {"/gen": {"methods": ["post", "PUT"], "takes_slot": True}},
        },
        "request": {"model_field": "engine", "model_header": "X-Model"},
    }
    profile = parse_profile(data, "p.yaml")
    assert profile.prefixes == ("fork", "fk")
    assert profile.version == "2"
    assert profile.route("/gen") == Route("/gen", frozenset({"POST", "PUT"}), takes_slot=True, model_from_body=True)
    assert (profile.health_path, profile.models_path, profile.props_path, profile.slots_path, profile.metrics_path) == (
        "/v1/health",
        "/models",
        "/p",
        "/slots?fail_on_no_slot=1",
        "/m",
    )
    assert (profile.model_field, profile.model_header) == ("engine", "X-Model")


def test_profile_is_frozen_and_read_only() -> None:
    profile = parse_profile(MINIMAL, "p.yaml")
    with pytest.raises(AttributeError):
        profile.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        profile.routes["/x"] = Route("/x", frozenset({"GET"}))  # type: ignore[index]


# ---- profile errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            [],
            "p.yaml: (document): wrong type: got []; "
            "expected a mapping with keys name, version, description, default_slots, routing, api, request",
        ),
        (
            changed(api={"paths": ["/v1/models"], "routes": MINIMAL["api"]["routes"]}),
            "p.yaml: api.paths: unknown key (did you mean routes?): got 'paths'; expected one of health_check_path, "
            "model_discovery_path, props_path, slots_path, metrics_path, routes",
        ),
        (
            changed(name="bad name"),
            "p.yaml: name: bad value: got 'bad name'; expected a name of letters, digits, '.', '_' or '-'",
        ),
        (
            changed(routing={"prefixes": []}),
            "p.yaml: routing.prefixes: missing or empty: got []; "
            "expected a list of prefix names or {name, enabled} mappings",
        ),
        (
            changed(routing={"prefixes": [{"name": "a", "enabled": False}]}),
            "p.yaml: routing.prefixes: no enabled prefix: got [{'name': 'a', 'enabled': False}]; "
            "expected at least one prefix with enabled: true",
        ),
        (
            changed(routing={"prefixes": [{"name": "a", "enabled": "no"}]}),
            "p.yaml: routing.prefixes[0].enabled: wrong type: got 'no'; expected true or false",
        ),
        (
            changed(routing={"prefixes": ["a/b"]}),
            "p.yaml: routing.prefixes[0]: bad prefix: got 'a/b'; expected a prefix of letters",
        ),
        (
            changed(routing={"prefixes": ["a", "a"]}),
            "p.yaml: routing.prefixes[1]: duplicate prefix: got 'a'; expected each prefix listed once",
        ),
        (
            changed(routing={"prefixes": [{"name": "a", "enabld": True}]}),
            "p.yaml: routing.prefixes[0].enabld: unknown key (did you mean enabled?)",
        ),
        (
            changed(request={"model_field_paths": ["model"]}),
            "p.yaml: request.model_field_paths: unknown key (did you mean model_field?)",
        ),
        (
            changed(api={}),
            "p.yaml: api.routes: missing or empty: got nothing; "
            "expected a mapping of path -> {methods, takes_slot, model_from_body}",
        ),
        (
            changed(api={"routes": {"v1/models": {"methods": ["GET"]}}}),
            "p.yaml: api.routes['v1/models']: bad route path: got 'v1/models'",
        ),
        (changed(api={"routes": {"/a?b=1": {"methods": ["GET"]}}}), "p.yaml: api.routes['/a?b=1']: bad route path"),
        (
            changed(api={"routes": {"/a": {"methods": ["FETCH"]}}}),
            "p.yaml: api.routes['/a'].methods[0]: unknown HTTP method: got 'FETCH'",
        ),
        (
            changed(api={"routes": {"/a": {}}}),
            "p.yaml: api.routes['/a'].methods: missing or empty: got nothing; expected a non-empty list of",
        ),
        (
            changed(api={"routes": {"/a": {"methods": "GET"}}}),
            "p.yaml: api.routes['/a'].methods: wrong type: got 'GET'",
        ),
        (
            changed(api={"routes": {"/a": {"methods": ["GET"], "takes_slot": "yes"}}}),
            "p.yaml: api.routes['/a'].takes_slot: wrong type: got 'yes'; expected true or false",
        ),
        (
            changed(api={"routes": {"/a": {"methods": ["GET"], "slot": True}}}),
            "p.yaml: api.routes['/a'].slot: unknown key",
        ),
        (
            changed(api={"health_check_path": "health", "routes": MINIMAL["api"]["routes"]}),
            "p.yaml: api.health_check_path: bad value: got 'health'; expected a path starting with '/'",
        ),
        (
            changed(request={"model_header": "X Model"}),
            "p.yaml: request.model_header: bad value: got 'X Model'; expected an HTTP header name",
        ),
        (changed(version=[1]), "p.yaml: version: wrong type: got [1]; expected a version string such as '1.0'"),
    ],
)
def test_profile_errors(data: Any, message: str) -> None:
    found = problems(data)
    assert len(found) == 1, found
    assert found[0].startswith(message)


def test_missing_name_and_every_other_problem_at_once() -> None:
    assert problems({"routing": {"prefixes": "llamacpp"}, "extra": 1}) == [
        "p.yaml: extra: unknown key: got 'extra'; expected one of name, version, description, default_slots, routing, api, request",
        "p.yaml: name: missing required key: got nothing; expected a name of letters, digits, '.', '_' or '-'",
        "p.yaml: routing.prefixes: wrong type: got 'llamacpp'; "
        "expected a list of prefix names or {name, enabled} mappings",
        "p.yaml: api.routes: missing or empty: got nothing; "
        "expected a mapping of path -> {methods, takes_slot, model_from_body}",
    ]


def test_prefix_conflicts_between_profiles() -> None:
    one = parse_profile(MINIMAL, "one.yaml")
    two = parse_profile(changed(name="other"), "two.yaml")
    assert prefix_conflicts({"tiny": one}) == []
    assert prefix_conflicts({"tiny": one, "other": two}) == [
        "two.yaml: routing.prefixes: prefix already enabled by profile 'tiny' (one.yaml): got 'tiny'; "
        "expected a prefix no other profile enables"
    ]


# ---- profile files ------------------------------------------------------------------------


def test_load_profiles_reports_every_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: a\nrouting: {prefixes: [a]}\napi: {routes: {/x: {methods: [GET]}}}\n")
    (tmp_path / "b.yml").write_text("name: a\nrouting: {prefixes: [b]}\napi: {routes: {/x: {methods: [GET]}}}\n")
    (tmp_path / "c.yaml").write_text("name: c\nroutes: {}\n")
    (tmp_path / "d.yaml").write_text("name: [unclosed\n")
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.raises(ConfigError) as caught:
        load_profiles(tmp_path)
    found = caught.value.problems
    assert (
        f"{tmp_path / 'b.yml'}: name: profile name already used by {tmp_path / 'a.yaml'}: got 'a'; "
        f"expected one file per profile name" in found
    )
    assert any(p.startswith(f"{tmp_path / 'c.yaml'}: routes: unknown key (did you mean routing?)") for p in found)
    assert any(p.startswith(f"{tmp_path / 'd.yaml'}: line 2, column 1: invalid YAML") for p in found)
    assert not any("notes.txt" in p for p in found)


def test_missing_profiles_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="profiles directory not found"):
        load_profiles(tmp_path / "nope")
