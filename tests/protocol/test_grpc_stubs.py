"""The committed gRPC modules (protocol/grpc_api/) are what grpcio-tools makes of
api/v1/log.proto: regenerated into a temporary directory, they must match byte for byte, but
for the lines that only stamp the generator's version (grpcio-tools is pinned to a compatible
range, not one release)."""

from __future__ import annotations

import pathlib
import re

import pytest

from protocol.grpc_api.__main__ import MODULES, PACKAGE_DIR, REPO, generate

# `# Protobuf Python Version: 7.35.1`, the runtime check's version numbers that follow
# `_runtime_version.Domain.PUBLIC,`, and `GRPC_GENERATED_VERSION = '1.85.1'`.
VERSION_STAMPS = [
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"(_runtime_version\.Domain\.PUBLIC,\n)(\s*\d+,\n){3}"),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE),
]


def without_version_stamps(text: str) -> str:
    for pattern in VERSION_STAMPS:
        text = pattern.sub("<version>", text)
    return text


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("grpc_stubs")
    generate(out)
    return out / PACKAGE_DIR


@pytest.mark.parametrize("name", MODULES)
def test_committed_modules_match_the_proto(regenerated, name):
    committed = (REPO / PACKAGE_DIR / name).read_text()
    fresh = (regenerated / name).read_text()
    assert without_version_stamps(committed) == without_version_stamps(fresh), (
        f"{PACKAGE_DIR}/{name} differs from what api/v1/log.proto generates: "
        "run `python -m protocol.grpc_api` and commit the result"
    )


def test_the_version_stamps_are_all_that_is_ignored():
    text = (REPO / PACKAGE_DIR / "log_pb2.py").read_text()
    assert without_version_stamps(text).count("<version>") == 2
    grpc_text = (REPO / PACKAGE_DIR / "log_pb2_grpc.py").read_text()
    assert without_version_stamps(grpc_text).count("<version>") == 1
    # a changed field is not a version stamp
    assert without_version_stamps(text.replace("max_records", "max_recs")) != (
        without_version_stamps(text)
    )


def test_the_generated_service_is_the_proto_service():
    from protocol.grpc_api import log_pb2

    service = log_pb2.DESCRIPTOR.services_by_name["Log"]
    assert service.full_name == "log.v1.Log"
    assert [m.name for m in service.methods] == [
        "Produce",
        "Consume",
        "ProduceStream",
        "ConsumeStream",
    ]
    streams = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert streams == {
        "Produce": (False, False),
        "Consume": (False, False),
        "ProduceStream": (True, True),
        "ConsumeStream": (False, True),
    }
