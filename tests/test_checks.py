"""checks.py: the problem lines config and profile files share, and the one ConfigError that lists them."""

from __future__ import annotations

from typing import Any

import pytest

from olla.checks import BAD, Checks, NotExpanded, key_path
from olla.errors import ConfigError


def number(value: Any) -> int:
    if not isinstance(value, int):
        raise ValueError("wrong type")
    return value


@pytest.mark.parametrize(
    ("path", "key", "joined"),
    [
        ("", "server", "server"),
        ("server", "port", "server.port"),
        ("api.routes", "/v1/models", "api.routes['/v1/models']"),
        ("x", 3, "x[3]"),
        ("", "two words", "['two words']"),
    ],
)
def test_key_paths_read_as_written_in_yaml(path: str, key: Any, joined: str) -> None:
    assert key_path(path, key) == joined


def test_a_problem_names_source_path_value_and_expectation() -> None:
    checks = Checks("f.yaml")
    checks.bad("", "wrong type", [1], "a mapping")
    checks.bad("a.b", "bad value", "x" * 100, "short")
    checks.bad("h", "bad header", "Bearer sk-1", "a header", secret=True)
    assert checks.problems == [
        "f.yaml: (document): wrong type: got [1]; expected a mapping",
        f"f.yaml: a.b: bad value: got '{'x' * 76}...; expected short",
        "f.yaml: h: bad header: got <redacted>; expected a header",
    ]


def test_width_and_scrub_shape_the_echoed_value() -> None:
    checks = Checks("c.yaml", width=100, scrub=lambda s: s.replace("pw", "***"))
    checks.bad("url", "bad value", "http://u:pw@h", "a URL")
    checks.bad("name", "bad value", "n" * 120, "short")
    assert checks.problems == [
        "c.yaml: url: bad value: got 'http://u:***@h'; expected a URL",
        f"c.yaml: name: bad value: got '{'n' * 96}...; expected short",
    ]


def test_unknown_keys_get_a_renamed_hint_before_a_spelling_hint() -> None:
    checks = Checks("p.yaml")
    section = checks.mapping({"paths": {}, "rout": 1, "zzz": 2}, "api", ("routes", "health"), {"paths": "routes"})
    assert section == {"paths": {}, "rout": 1, "zzz": 2}
    assert [p.split(": got")[0] for p in checks.problems] == [
        "p.yaml: api.paths: unknown key (did you mean routes?)",
        "p.yaml: api.rout: unknown key (did you mean routes?)",
        "p.yaml: api.zzz: unknown key",
    ]


def test_getters_expand_then_convert_and_record_what_failed() -> None:
    def expand(value: str) -> str:
        if "${" in value:
            raise NotExpanded("unset", "a set variable")
        return value.replace("$N", "7")

    checks = Checks("c.yaml", expand=expand)
    data = {"ok": 5, "env": "${X}", "bad": "x"}
    assert checks.get(data, "ok", "s", 0, number, "an integer") == 5
    assert checks.get(data, "gone", "s", 9, number, "an integer") == 9
    assert checks.get(data, "bad", "s", 9, number, "an integer") == 9
    assert checks.require(data, "env", "s", number, "an integer") is BAD
    assert checks.require(data, "gone", "s", number, "an integer") is BAD
    assert checks.problems == [
        "c.yaml: s.bad: wrong type: got 'x'; expected an integer",
        "c.yaml: s.env: unset: got '${X}'; expected a set variable",
        "c.yaml: s.gone: missing required key: got nothing; expected an integer",
    ]


def test_done_raises_every_problem_at_once_and_nothing_when_clean() -> None:
    checks = Checks("f.yaml")
    checks.done()
    checks.absent("a", None, "a list")
    checks.absent("b", "x", "a list")
    with pytest.raises(ConfigError) as caught:
        checks.done()
    assert caught.value.problems == [
        "f.yaml: a: missing or empty: got nothing; expected a list",
        "f.yaml: b: wrong type: got 'x'; expected a list",
    ]
