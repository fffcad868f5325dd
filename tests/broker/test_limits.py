"""`Limits`: the defaults are valid, each bad value is named, and every field is documented
in docs/configuration.md's [limits] table with its default."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

from broker.limits import Limits

CONFIGURATION_DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def documented_limits() -> dict[str, str]:
    """Key -> default column of each row of the [limits] table."""
    section = CONFIGURATION_DOC.read_text().split("## `[limits]`")[1].split("\n## ")[0]
    return dict(re.findall(r"^\| `([a-z_]+)` \| `([0-9]+)`", section, re.MULTILINE))


def test_every_limit_is_documented_with_its_default():
    documented = documented_limits()
    defaults = {field.name: str(field.default) for field in dataclasses.fields(Limits)}
    assert documented == defaults


def test_the_defaults_have_no_problems():
    assert Limits().problems() == []


@pytest.mark.parametrize(
    "name, value",
    [
        ("http_request_read_timeout_ms", 99),
        ("http_response_write_timeout_ms", 99),
        ("http_fetch_bytes_max", 1023),
        ("http_append_timeout_ms", 99),
        ("flush_check_interval_ms", 9),
        ("group_expiry_check_interval_ms", 9),
        ("recovery_point_interval_ms", 999),
        ("cleaner_keys_max", 999),
    ],
)
def test_a_bad_value_is_named(name, value):
    problems = Limits(**{name: value}).problems()
    assert len(problems) == 1 and f"limits.{name}" in problems[0]
