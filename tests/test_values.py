"""values.py: the grammar of single config values, read without a config file around them."""

from __future__ import annotations

import pytest

from olla.values import parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("15m", 900.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        (5, 5.0),
        (2.5, 2.5),
        ("7", 7.0),
        ("0", 0.0),
        ("250us", 0.00025),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("-5s", "negative"),
        (-1, "negative"),
        ("5 s", "not a duration"),
        ("5sec", "not a duration"),
        ("", "not a duration"),
        ("1m30", "not a duration"),
        (True, "wrong type"),
        (None, "wrong type"),
        (float("inf"), "finite"),
    ],
)
def test_bad_durations(value: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1024, 1024),
        ("100MiB", 100 * 2**20),
        ("10MB", 10_000_000),
        ("512KiB", 512 * 1024),
        ("1GiB", 2**30),
        ("2kb", 2000),
        ("42", 42),
    ],
)
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["10XB", "-1MiB", "MiB", True, 1.5])
def test_bad_sizes(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)
