"""`jaxinfer serve`: OpenAI-compatible HTTP and JetStream-compatible gRPC front ends.

Layer 6: talks to the async engine and the tokenizer only (docs/architecture.md).
"""
