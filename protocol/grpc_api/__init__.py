"""The gRPC API's generated modules (`log_pb2`, `log_pb2_grpc`), from ``api/v1/log.proto``.

They are committed. After changing the .proto, regenerate them (grpcio-tools is a test
dependency) with ``python -m protocol.grpc_api``; tests/protocol/test_grpc_stubs.py
regenerates them into a temporary directory and fails when they differ.
"""
