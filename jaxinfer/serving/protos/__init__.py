"""The gRPC APIs of `jaxinfer serve`: .proto files and the Python modules generated from them.

- jetstream.proto (package `jetstream_proto`): JetStream's Orchestrator API, wire-compatible.
- jaxinfer.proto (package `jaxinfer.v1`): jaxinfer's own Generation API.

The *_pb2.py, *_pb2.pyi and *_pb2_grpc.py modules are generated and checked in; after
editing a .proto, regenerate them with `python3 -m jaxinfer.serving.protos.generate`
(tests/serving/test_protos.py fails while they are stale).
"""
