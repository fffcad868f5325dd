"""The protocol package is sans-I/O: it imports neither trio nor socket.

`socket` itself ends up in `sys.modules` through a dependency (crc32c imports
importlib.metadata, which imports email, which imports socket), so for socket the check is on
the package's own source; for trio (and other I/O frameworks) it is on what importing does.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import protocol

PACKAGE_DIRECTORY = pathlib.Path(protocol.__file__).parent
FORBIDDEN_MODULES = {"trio", "socket", "asyncio", "selectors", "ssl", "anyio"}


def imported_modules(source: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_no_protocol_module_imports_io_modules():
    sources = sorted(PACKAGE_DIRECTORY.rglob("*.py"))
    assert {path.name for path in sources} >= {"frame.py", "record_batch.py", "__init__.py"}
    for path in sources:
        forbidden = imported_modules(path.read_text()) & FORBIDDEN_MODULES
        assert not forbidden, f"{path.name} imports {sorted(forbidden)}"
        assert "__import__" not in path.read_text(), path.name
        assert "importlib" not in path.read_text(), path.name


def test_imported_modules_sees_both_import_forms():
    assert imported_modules("import socket\nfrom trio import lowlevel\n") == {"socket", "trio"}


def test_importing_protocol_does_not_load_trio():
    check = (
        "import sys, protocol; "
        "loaded = sorted(m for m in ('trio', 'asyncio', 'anyio') if m in sys.modules); "
        "assert not loaded, loaded"
    )
    subprocess.run(
        [sys.executable, "-c", check], cwd=PACKAGE_DIRECTORY.parent, check=True, timeout=60
    )
