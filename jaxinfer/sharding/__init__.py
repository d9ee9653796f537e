"""Logical axis names and the one table that maps them to mesh axes."""
from jaxinfer.sharding.rules import DEFAULT_RULES, logical_to_mesh_spec  # noqa: F401
