"""The grammar of scalar config values: durations, sizes, `${VAR}`, URLs, and converters.

Pure functions from one value to one typed value, each raising ValueError with a
short problem. They know nothing of YAML, key paths or how problems are reported:
that is `olla.config`, whose reader expands `${VAR}` and then runs one converter on
every value it reads. Kept apart so the grammar reads and tests on its own.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import SplitResult, urlsplit, urlunsplit

T = TypeVar("T")
Convert = Callable[[Any], T]


# ---- durations and sizes -----------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = re.compile(r"[+-]?(\d+(?:\.\d*)?|\.\d+)")
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DURATION_EXPECTED = "a duration such as 500ms, 5s, 15m, 1h or 1m30s (plain numbers are seconds)"
SIZE_EXPECTED = "a size in bytes, or a string such as 512KiB, 10MB or 100MiB"


def parse_duration(value: object) -> float:
    """Seconds from `500ms`, `5s`, `15m`, `1h`, `1m30s` or a plain number of seconds; raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("wrong type")
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif text.startswith("-"):
            raise ValueError("negative duration")
        else:
            parts = list(_DURATION_PART.finditer(text))
            if not parts or "".join(p.group(0) for p in parts) != text:
                raise ValueError("not a duration")
            seconds = sum(float(p.group(1)) * _DURATION_UNITS[p.group(2)] for p in parts)
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError("not a finite duration")
    if seconds < 0:
        raise ValueError("negative duration")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an int or `512KiB`, `10MB`, `100MiB` (KB = 1000, KiB = 1024); raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("wrong type")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("negative size")
        return value
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError("negative size" if value.strip().startswith("-") else "not a size")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


# ---- ${VAR} expansion --------------------------------------------------------------------

class _Expanded(str):
    """A string that came from `${VAR}`; int and bool keys accept it, since env values are always text."""


class UnsetVariable(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


_REFERENCE = re.compile(r"\$\$|\$\{([^}]*)\}|\$\{")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_env(text: str, env: Mapping[str, str]) -> str:
    """`${VAR}`, `${VAR:-default}` (default when unset or empty) and `$$` for a literal `$`; raises ValueError."""
    substituted = False

    def replace(match: re.Match[str]) -> str:
        nonlocal substituted
        if match.group(0) == "$$":
            return "$"
        body = match.group(1)
        if body is None:
            raise ValueError("unterminated ${")
        name, has_default, default = body.partition(":-")
        if not _VAR_NAME.fullmatch(name) or "${" in default:
            raise ValueError(f"bad variable reference ${{{body}}}")
        substituted = True
        found = env.get(name)
        if found is None or (has_default and found == ""):
            if has_default:
                return default
            raise UnsetVariable(name)
        return found

    result = _REFERENCE.sub(replace, text)
    return _Expanded(result) if substituted else result


# ---- URLs --------------------------------------------------------------------------------

def _url_parts(value: Any) -> SplitResult:
    """An absolute http(s) URL with a host and no credentials; scheme and host lowercased."""
    if not isinstance(value, str):
        raise ValueError("wrong type")
    if not value or any(c.isspace() for c in value):
        raise ValueError("empty or contains whitespace")
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("unsupported scheme" if parts.scheme else "not an absolute URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials (user:pass@) in the URL are not allowed; send them with headers")
    if not parts.hostname:
        raise ValueError("no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("bad port") from None
    if port == 0:
        raise ValueError("bad port")
    if parts.fragment:
        raise ValueError("a #fragment is not allowed")
    return parts._replace(scheme=parts.scheme.lower(), netloc=parts.netloc.lower())


def base_url(value: Any) -> str:
    parts = _url_parts(value)
    if parts.query:
        raise ValueError("a ?query is not allowed in an endpoint url")
    return urlunsplit(parts._replace(path=parts.path.rstrip("/")))


def target_url(value: Any) -> str:
    """An absolute http(s) URL, or a path to join to the endpoint's url."""
    if isinstance(value, str) and value and not urlsplit(value).scheme and not value.startswith("//"):
        if any(c.isspace() for c in value) or "#" in value:
            raise ValueError("contains whitespace or a #fragment")
        return str(value)
    return urlunsplit(_url_parts(value))


def url_key(url: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}[parts.scheme]
    return parts.scheme, parts.hostname or "", port, parts.path.rstrip("/")


def join_url(base: str, target: str) -> str:
    """An absolute target as is; a path joined to base, keeping base's own path."""
    if urlsplit(target).scheme:
        return target
    return base.rstrip("/") + "/" + target.lstrip("/")


def without_password(text: str) -> str:
    """`text` with a URL's password shown as ***, for echoing a value in a message."""
    try:
        parts = urlsplit(text)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    except ValueError:
        pass
    return text


# ---- converters: value -> typed value, or ValueError(problem) -----------------------------


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("wrong type")
    if not value.strip() or value != value.strip():
        raise ValueError("empty or padded with whitespace")
    return str(value)


def integer(low: int, high: int | None = None) -> Convert[int]:
    def convert(value: Any) -> int:
        if isinstance(value, _Expanded) and _NUMBER.fullmatch(value.strip()) and "." not in value:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("wrong type")
        if value < low or (high is not None and value > high):
            raise ValueError("out of range")
        return value

    return convert


def boolean(value: Any) -> bool:
    if isinstance(value, _Expanded) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    if not isinstance(value, bool):
        raise ValueError("wrong type")
    return value


def duration(low: float, *, exclusive: bool = False) -> Convert[float]:
    def convert(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds < low or (exclusive and seconds == low):
            raise ValueError("too short")
        return seconds

    return convert


def size(value: Any) -> int:
    count = parse_size(value)
    if count == 0:
        raise ValueError("zero size")
    return count


def choice(options: tuple[str, ...]) -> Convert[str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("wrong type")
        if value.lower() in options:
            return value.lower()
        hint = difflib.get_close_matches(value.lower(), options, n=1)
        raise ValueError(f"unknown value (did you mean {hint[0]}?)" if hint else "unknown value")

    return convert


def header_value(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("wrong type")
    if not value.strip():
        raise ValueError("empty header value")
    if any(c in value for c in "\r\n\0"):
        raise ValueError("header value contains a line break")
    return str(value)
