"""jaxinfer: a JAX/XLA inference stack for LLMs (see ../shared/ARCHITECTURE.md for the map)."""
from jaxinfer.config import EngineConfig, ModelConfig, SamplingParams
from jaxinfer.session import InferenceSession
from jaxinfer.types import RequestOutput

__all__ = ["EngineConfig", "InferenceSession", "ModelConfig", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
