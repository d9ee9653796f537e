"""jaxinfer: a JAX/XLA inference stack for LLMs (docs/architecture.md is the map).

Besides the public names, importing the package installs one logging filter: jax probes
for a TPU on every machine and, where libtpu is missing, logs "Unable to initialize
backend 'tpu'" at INFO, which absl's handler (the CLI, the benchmarks) prints on every
run. The filter drops exactly that record; every other jax message passes.
"""
import logging

# The logger jax's backend discovery writes to (jax/_src/xla_bridge.py).
_XLA_BRIDGE_LOGGER = "jax._src.xla_bridge"
_TPU_PROBE_MESSAGE = "Unable to initialize backend 'tpu'"


class _TpuProbeFilter(logging.Filter):
    """Drops the INFO record of a failed (optional) TPU backend probe."""

    # NOTE: marks the filter so a re-import (importlib.reload) finds the installed one
    # even though it then sees a different class object.
    is_jaxinfer_tpu_probe_filter = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and record.getMessage().startswith(_TPU_PROBE_MESSAGE))


def _install_tpu_probe_filter() -> None:
    """Installs the filter on jax's backend logger once; later calls change nothing."""
    logger = logging.getLogger(_XLA_BRIDGE_LOGGER)
    if not any(getattr(f, "is_jaxinfer_tpu_probe_filter", False) for f in logger.filters):
        logger.addFilter(_TpuProbeFilter())


# NOTE: installed before the package's own imports, so that a submodule which touches a
# device while it is imported already runs with the filter in place.
_install_tpu_probe_filter()

from jaxinfer.config import EngineConfig, ModelConfig, SamplingParams, SpeculativeConfig  # noqa: E402
from jaxinfer.session import InferenceSession  # noqa: E402
from jaxinfer.types import RequestOutput  # noqa: E402

__all__ = ["EngineConfig", "InferenceSession", "ModelConfig", "RequestOutput", "SamplingParams", "SpeculativeConfig"]
__version__ = "0.1.0"
