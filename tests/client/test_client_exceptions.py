"""Every exception the client library can raise to a user is exported from `client`, and
every error a broker causes is a `DwalError` (one `except DwalError` catches them)."""

from __future__ import annotations

import importlib
import inspect
import pathlib

import client
from protocol import DwalError

CLIENT_DIRECTORY = pathlib.Path(client.__file__).parent
# The command-line program's own modules: their exceptions end as exit statuses, never
# reach library users.
COMMAND_MODULES = {"cli", "consume_command", "grpc_command", "record_format", "line_splitter"}


def library_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for path in sorted(CLIENT_DIRECTORY.glob("*.py")):
        if path.stem.startswith("_") or path.stem in COMMAND_MODULES:
            continue
        module = importlib.import_module(f"client.{path.stem}")
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found[name] = value
    return found


def test_every_library_exception_is_exported():
    exceptions = library_exceptions()
    assert {"ConnectionFailed", "DeliveryOutcomeUnknown", "MalformedResponseError"} <= set(
        exceptions
    )
    missing = sorted(
        name for name in exceptions if getattr(client, name, None) is not exceptions[name]
    )
    assert not missing, f"not exported from client: {missing}"
    assert not [name for name in exceptions if name not in client.__all__]


def test_errors_a_broker_causes_are_dwal_errors():
    for name, exception in library_exceptions().items():
        if name == "UnknownOptionError":  # a programming error: a TypeError, as Python's own
            assert issubclass(exception, TypeError)
            continue
        assert issubclass(exception, DwalError), f"{name} is not a DwalError"
    assert client.DwalError is DwalError
