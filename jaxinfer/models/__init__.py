"""Flax model families, the architecture registry, checkpoint and tokenizer loading."""
