"""Regenerate the gRPC API's modules from api/v1/log.proto: ``python -m protocol.grpc_api
[--out DIR]`` (default: the repository root, so the modules land in protocol/grpc_api/)."""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
PROTO = "api/v1/log.proto"
PACKAGE_DIR = "protocol/grpc_api"  # where the modules go, under the output directory
MODULES = ("log_pb2.py", "log_pb2.pyi", "log_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    """Write MODULES into out_dir/PACKAGE_DIR. The proto is mapped to PACKAGE_DIR so the
    generated imports read ``from protocol.grpc_api import log_pb2``."""
    from grpc_tools import protoc  # a test dependency: only needed to regenerate

    (out_dir / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    arguments = [
        "protoc",
        f"-I{PACKAGE_DIR}={REPO / 'api/v1'}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(REPO / PROTO),
    ]
    status = protoc.main(arguments)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}: {' '.join(arguments)}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m protocol.grpc_api", description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=REPO, help="output root")
    args = parser.parse_args()
    generate(args.out)
    for name in MODULES:
        print(args.out / PACKAGE_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
