"""Start-up output: importing jaxinfer keeps jax's failed-TPU-probe message out of the logs.

jax looks for a TPU on every machine and, without libtpu, logs "Unable to initialize
backend 'tpu'" at INFO; absl's handler (the CLI, the benchmarks) prints INFO records.
The subprocesses run with JAX_PLATFORMS removed so that jax probes every backend, with
INFO records made visible the two ways jaxinfer's programs do it.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

import jaxinfer

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TPU_PROBE = "Unable to initialize backend 'tpu'"
_MARKER = "jaxinfer-quiet-startup-marker"

# Each program prints the devices, then logs one other INFO record on jax's backend
# logger: it must still come through (the filter drops exactly one message).
_PROGRAMS = {
    "stdlib_logging": f"""
        import logging
        logging.basicConfig(level=logging.INFO)
        import jax
        import jaxinfer
        print(jax.devices())
        logging.getLogger("jax._src.xla_bridge").info("{_MARKER}")
        """,
    "absl_app": f"""
        import logging
        from absl import app
        import jaxinfer

        def main(argv):
            import jax
            print(jax.devices())
            logging.getLogger("jax._src.xla_bridge").info("{_MARKER}")

        app.run(main, argv=["prog", "--verbosity=0"])
        """,
}


@pytest.mark.parametrize("program", sorted(_PROGRAMS))
def test_no_tpu_probe_message_without_jax_platforms(program):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_PROGRAMS[program])], cwd=_REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert _TPU_PROBE not in output, output
    assert "libtpu" not in output, output
    assert _MARKER in output, output


def _record(level, message):
    return logging.LogRecord("jax._src.xla_bridge", level, __file__, 1, message, None, None)


def test_filter_drops_only_the_tpu_probe_record():
    (probe_filter,) = [f for f in logging.getLogger("jax._src.xla_bridge").filters
                       if getattr(f, "is_jaxinfer_tpu_probe_filter", False)]
    tpu = f"{_TPU_PROBE}: INTERNAL: Failed to open libtpu.so"
    assert not probe_filter.filter(_record(logging.INFO, tpu))
    assert probe_filter.filter(_record(logging.WARNING, tpu))
    assert probe_filter.filter(_record(logging.INFO, "Unable to initialize backend 'cuda': no GPU"))
    assert probe_filter.filter(_record(logging.INFO, "Initializing backend 'cpu'"))


def test_installing_twice_keeps_one_filter():
    jaxinfer._install_tpu_probe_filter()
    jaxinfer._install_tpu_probe_filter()
    filters = logging.getLogger("jax._src.xla_bridge").filters
    assert sum(getattr(f, "is_jaxinfer_tpu_probe_filter", False) for f in filters) == 1
