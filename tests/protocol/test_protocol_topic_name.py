"""Topic names follow Kafka's rules: [a-zA-Z0-9._-], 1 to 249 characters, not '.' or '..'."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocol_strategies import fast

import protocol

LEGAL_CHARACTERS = string.ascii_letters + string.digits + "._-"

legal_names = st.text(alphabet=LEGAL_CHARACTERS, min_size=1, max_size=249).filter(
    lambda name: name not in (".", "..")
)


@pytest.mark.parametrize(
    "name",
    ["t", "orders", "Orders.v2", "a-b_c.d", "...", ".hidden", "-", "_", "9", "x" * 249],
)
def test_legal_names(name):
    assert protocol.validate_topic_name(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 250,
        ".",
        "..",
        "has space",
        " leading",
        "trailing ",
        "tab\there",
        "newline\n",
        "slash/name",
        "colon:name",
        "caf\u00e9",
        "\u0661\u0662",  # Arabic-Indic digits: str.isdigit() is true for them
        "\uff21",  # fullwidth A
        "\u212a",  # Kelvin sign: case-insensitive matching would fold it to 'k'
        "emoji\U0001f600",
        "nul\x00",
    ],
)
def test_illegal_names(name):
    reason = protocol.validate_topic_name(name)
    assert isinstance(reason, str) and reason


@pytest.mark.parametrize("name", [None, b"topic", 5, ["topic"], True])
def test_non_strings_are_illegal(name):
    assert isinstance(protocol.validate_topic_name(name), str)


@given(name=legal_names)
@fast(200)
def test_any_name_of_legal_characters_is_legal(name):
    assert protocol.validate_topic_name(name) is None


@given(
    prefix=st.text(alphabet=LEGAL_CHARACTERS, max_size=20),
    bad=st.characters(blacklist_characters=LEGAL_CHARACTERS),
    suffix=st.text(alphabet=LEGAL_CHARACTERS, max_size=20),
)
@fast(200)
def test_any_other_character_makes_a_name_illegal(prefix, bad, suffix):
    assert isinstance(protocol.validate_topic_name(prefix + bad + suffix), str)


@given(name=st.text(alphabet=LEGAL_CHARACTERS, min_size=250, max_size=400))
@fast(30)
def test_long_names_are_illegal(name):
    assert "longer" in protocol.validate_topic_name(name)
