"""The generated gRPC modules (jaxinfer/serving/protos/*_pb2*.py{,i}) match their .proto files.

Fails when a .proto was edited without regenerating: run
`python3 -m jaxinfer.serving.protos.generate`. The generator runs protoc into a temporary
folder; nothing in the repository is written.
"""
from __future__ import annotations

import re

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (the generator) is not installed")

from jaxinfer.serving.protos import generate  # noqa: E402

_STAMP = re.compile(rb"by grpcio-tools ([0-9][^:\s]*):")
_DESCRIPTOR = re.compile(rb"AddSerializedFile\((b'.*?')\)\n")


def _checked_in(name: str) -> bytes:
    path = generate.PROTOS_DIR / name
    assert path.is_file(), f"{name} is missing: run python3 -m jaxinfer.serving.protos.generate"
    return path.read_bytes()


def test_generated_modules_are_fresh():
    fresh = generate.generate()
    assert sorted(fresh) == sorted(generate.generated_names())
    installed = generate.tools_version().encode()
    for name, data in fresh.items():
        old = _checked_in(name)
        stamp = _STAMP.search(old)
        if stamp is not None and stamp.group(1) == installed:
            assert old == data, f"{name} is stale: run python3 -m jaxinfer.serving.protos.generate"
        elif name.endswith("_pb2.py"):
            # Another grpcio-tools than the one that generated them: their text differs in
            # version stamps, but the descriptors (what the .proto says) must be the same.
            assert _DESCRIPTOR.search(old).group(1) == _DESCRIPTOR.search(data).group(1), \
                f"{name} is stale: run python3 -m jaxinfer.serving.protos.generate"


def test_check_mode_reports_stale_files(tmp_path, capsys):
    stamp = _STAMP.search(_checked_in("jetstream_pb2.py"))
    if stamp is None or stamp.group(1) != generate.tools_version().encode():
        pytest.skip("the checked-in modules come from another grpcio-tools version")
    assert generate.main(["--check"]) == 0
    for name in generate.generated_names():
        (tmp_path / name).write_bytes(_checked_in(name))
    (tmp_path / "jetstream_pb2.py").write_bytes(b"# edited\n")
    assert generate.stale_files(tmp_path) == ["jetstream_pb2.py"]


def test_generated_modules_import_with_the_installed_runtime():
    from jaxinfer.serving.protos import jaxinfer_pb2, jaxinfer_pb2_grpc, jetstream_pb2, jetstream_pb2_grpc

    assert jetstream_pb2.DESCRIPTOR.package == "jetstream_proto"
    assert jaxinfer_pb2.DESCRIPTOR.package == "jaxinfer.v1"
    assert jetstream_pb2.DESCRIPTOR.name == "jaxinfer/serving/protos/jetstream.proto"
    assert hasattr(jetstream_pb2_grpc, "OrchestratorStub") and hasattr(jaxinfer_pb2_grpc, "GenerationStub")


def test_jetstream_wire_numbers():
    """The tags, types and names JetStream clients send and expect (its public jetstream.proto)."""
    from google.protobuf.descriptor import FieldDescriptor as F

    from jaxinfer.serving.protos import jetstream_pb2 as js

    def fields(message):
        return {f.name: (f.number, f.type, f.is_repeated) for f in message.DESCRIPTOR.fields}

    assert fields(js.DecodeRequest) == {
        "max_tokens": (4, F.TYPE_INT32, False), "text_content": (5, F.TYPE_MESSAGE, False),
        "token_content": (6, F.TYPE_MESSAGE, False), "metadata": (7, F.TYPE_MESSAGE, False),
        "num_samples": (8, F.TYPE_INT32, False)}
    assert fields(js.DecodeRequest.TextContent) == {"text": (1, F.TYPE_STRING, False)}
    assert fields(js.DecodeRequest.TokenContent) == {"token_ids": (1, F.TYPE_INT32, True)}
    assert fields(js.DecodeRequest.Metadata) == {"start_time": (1, F.TYPE_FLOAT, False)}
    assert fields(js.DecodeResponse) == {"initial_content": (2, F.TYPE_MESSAGE, False),
                                         "stream_content": (3, F.TYPE_MESSAGE, False)}
    assert fields(js.DecodeResponse.StreamContent) == {"samples": (1, F.TYPE_MESSAGE, True)}
    assert fields(js.DecodeResponse.StreamContent.Sample) == {"text": (1, F.TYPE_STRING, False),
                                                              "token_ids": (2, F.TYPE_INT32, True)}
    assert fields(js.HealthCheckResponse) == {"is_live": (1, F.TYPE_BOOL, False)}
    service = js.DESCRIPTOR.services_by_name["Orchestrator"]
    assert service.full_name == "jetstream_proto.Orchestrator"
    assert {m.name: (m.input_type.name, m.output_type.name) for m in service.methods} == {
        "Decode": ("DecodeRequest", "DecodeResponse"), "HealthCheck": ("HealthCheckRequest", "HealthCheckResponse")}
