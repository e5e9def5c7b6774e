"""Reading one config or profile document while collecting its problems, to report them all at once.

Each problem reads `<source>: <key.path[index]>: <problem>: got <value>; expected <what>`,
and `done()` raises one `ConfigError` listing every one, so a user fixes a file in one pass.
`Checks` knows no key of either format and no value grammar: `olla.config` and
`olla.profiles` bring the keys and the converters (value -> typed value, or ValueError),
and config its `${VAR}` expansion. Both import this module, which imports only `olla.errors`.
"""

from __future__ import annotations

import difflib
import enum
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from olla.errors import ConfigError

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class Shown(str):
    """Printed as is, not through repr."""


NOTHING = Shown("nothing")  # what a problem "got" when the key is missing
T = TypeVar("T")


class Bad(enum.Enum):
    """What a check returns after recording a problem."""

    BAD = 0


BAD = Bad.BAD


class NotExpanded(ValueError):
    """Raised by an `expand` hook: what is wrong with a string's references, and what would be right."""

    def __init__(self, problem: str, expected: str) -> None:
        super().__init__(problem)
        self.expected = expected


class Checks:
    """The problems found so far in one document, named by `source`.

    Values are echoed through repr, cut to `width` characters; strings pass through
    `scrub` first (config hides URL passwords), and a secret is never echoed at all.
    Every string a getter reads passes through `expand`, when given, before its converter.
    """

    def __init__(
        self,
        source: str,
        *,
        width: int = 80,
        scrub: Callable[[str], str] | None = None,
        expand: Callable[[str], str] | None = None,
    ) -> None:
        self.source = source
        self.width = width
        self.scrub = scrub
        self.expand = expand
        self.problems: list[str] = []

    def bad(self, path: str, problem: str, got: Any, expected: str, *, secret: bool = False) -> None:
        self.problems.append(
            f"{self.source}: {path or '(document)'}: {problem}: got {self.show(got, secret)}; expected {expected}"
        )

    def absent(self, path: str, value: Any, expected: str) -> None:
        """A required list or mapping that is missing, empty or of the wrong type."""
        empty = value is None or (isinstance(value, (list, Mapping)) and not value)
        self.bad(path, "missing or empty" if empty else "wrong type", NOTHING if value is None else value, expected)

    def mapping(
        self, value: Any, path: str, keys: tuple[str, ...], renamed: Mapping[str, str] | None = None
    ) -> Mapping[Any, Any]:
        """A section: None is empty; unknown keys are reported with the closest known one.

        `renamed` maps keys of an older format to their name here, a better hint than spelling.
        """
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.bad(path, "wrong type", value, f"a mapping with keys {', '.join(keys)}")
            return {}
        for key in value:
            if key not in keys:
                new = renamed.get(key) if renamed else None
                hint = [new] if new is not None and new in keys else difflib.get_close_matches(str(key), keys, n=1)
                problem = f"unknown key (did you mean {hint[0]}?)" if hint else "unknown key"
                self.bad(key_path(path, key), problem, key, f"one of {', '.join(keys)}")
        return value

    def check(
        self, value: Any, path: str, convert: Callable[[Any], T], expected: str, *, secret: bool = False
    ) -> T | Bad:
        """`convert(value)` after expansion, or BAD with the problem recorded."""
        if isinstance(value, str) and self.expand is not None:
            try:
                value = self.expand(value)
            except NotExpanded as exc:
                self.bad(path, str(exc), value, exc.expected, secret=secret)
                return BAD
        try:
            return convert(value)
        except ValueError as exc:
            self.bad(path, str(exc) or "bad value", value, expected, secret=secret)
            return BAD

    def get(
        self, data: Mapping[Any, Any], key: str, path: str, default: T, convert: Callable[[Any], T], expected: str
    ) -> T:
        """data[key] checked; the default when it is absent or bad (the problem is recorded)."""
        if key not in data:
            return default
        result = self.check(data[key], key_path(path, key), convert, expected)
        return default if isinstance(result, Bad) else result

    def require(
        self, data: Mapping[Any, Any], key: str, path: str, convert: Callable[[Any], T], expected: str
    ) -> T | Bad:
        if key not in data:
            self.bad(key_path(path, key), "missing required key", NOTHING, expected)
            return BAD
        return self.check(data[key], key_path(path, key), convert, expected)

    def done(self) -> None:
        """Raises one ConfigError listing every problem, if there is any."""
        if self.problems:
            raise ConfigError(self.problems)

    def show(self, value: Any, secret: bool) -> str:
        if secret:
            return "<redacted>"
        if isinstance(value, Shown):
            return str(value)
        text = repr(self.scrub(str(value)) if self.scrub is not None and isinstance(value, str) else value)
        return text if len(text) <= self.width else text[: self.width - 3] + "..."


def key_path(path: str, key: Any) -> str:
    """`path.key` for a plain key, `path['odd key']` (or `path[3]`) for any other."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"
