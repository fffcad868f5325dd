"""The user guides can be followed one after the other on the same broker."""

from __future__ import annotations

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[2]


def created_topics(path: pathlib.Path) -> set[str]:
    return set(re.findall(r"dwal topic create (\S+)", path.read_text()))


def test_readme_and_quickstart_create_different_topics():
    readme = created_topics(REPO / "README.md")
    quickstart = created_topics(REPO / "docs" / "quickstart.md")
    assert readme and quickstart
    assert not readme & quickstart, "following one guide after the other: TOPIC_ALREADY_EXISTS"


def test_readme_starts_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    commands = [line.split("#")[0].strip() for line in lines[3:5]]
    assert lines[2] == "```sh" and commands == ["make run", "make test"]
