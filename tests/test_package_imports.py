"""The dependency rule of DESIGN.md, checked on the source: `protocol` imports nothing of
ours and no I/O (trio, sockets); `broker` and `client` import `protocol`, never each other."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "protocol": {"broker", "client", "trio", "socket", "selectors", "asyncio"},
    "client": {"broker"},
    "broker": {"client"},
}


def imported_top_names(path: pathlib.Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every import in the file, at any depth (a function-local
    import counts as much as one at the top)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, name in sorted(imported_top_names(path)):
            if name in FORBIDDEN[package]:
                found.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_dependency_rule(package):
    assert violations(package) == []


def test_the_checker_sees_function_local_imports(tmp_path):
    module = tmp_path / "module.py"
    module.write_text(
        "def f():\n    from broker.node import run_broker\n    import trio.lowlevel\n"
    )
    assert imported_top_names(module) == {(2, "broker"), (3, "trio")}
