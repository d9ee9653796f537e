"""The notebooks: stored without outputs, and each one executed headless on CPU with small settings.

Execution (marker `notebooks`, outside the default run; `python3 tasks.py notebooks` runs
it, and CI calls that task after the test suite): nbclient runs every code cell in a
fresh kernel and fails on the first cell error. After the cell tagged `parameters` a
cell is injected (papermill's convention) that sets SIZE = "small" and the OVERRIDES
below, which keep each notebook within its timeout on a 2-core machine.

The kernel: a kernelspec written into a temporary JUPYTER_PATH folder whose argv is
this interpreter (`sys.executable -m ipykernel_launcher`), so the notebooks run with the
same environment as the tests (the venv of `tasks.py`) in a fresh clone, whatever
kernels the machine has registered; its env pins the CPU backend, turns progress bars
off and shares one compilation cache folder between the notebooks of a run.
"""
from __future__ import annotations

import json
import os
import sys
import time

import nbformat
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DIR = os.path.join(_REPO, "notebooks")
NOTEBOOKS = ("01_quickstart", "02_benchmark_and_roofline", "03_int4", "04_shared_prefix", "05_meshes_on_tpu",
             "06_serving")
# Extra-small settings for CI (the notebooks' own SMALL settings are for a person on a CPU runtime).
OVERRIDES = {
    "01_quickstart": {"max_tokens": 12, "num_prompts": 4},
    "02_benchmark_and_roofline": {"batch_sizes": "1,4", "repeats": 1, "num_requests": 8, "num_requests_sweep": "1,8",
                                  "output_len": 8, "throughput_output_len": 8},
    "03_int4": {"calibration_sequences": 2, "calibration_length": 64, "eval_max_tokens": 2048, "decode_tokens": 8},
    "04_shared_prefix": {"prefix_lens": [0, 192], "output_len": 4},
    "05_meshes_on_tpu": {"dense_tp": [1, 2], "moe_layouts": [[1, 1], [8, 1], [4, 2]], "new_tokens": 2,
                         "plan_hardware": ["tpu-v5e"]},
    "06_serving": {"request_rates": "4,16", "num_prompts": 6, "output_len": 8},
}
TIMEOUT_S = 240  # per notebook (nbclient's per-cell timeout is the same bound)
_KERNEL = "jaxinfer-tests"


def _load(name: str):
    return nbformat.read(os.path.join(_DIR, f"{name}.ipynb"), as_version=4)


def test_every_notebook_is_listed():
    stored = sorted(n[:-len(".ipynb")] for n in os.listdir(_DIR) if n.endswith(".ipynb"))
    assert stored == sorted(NOTEBOOKS) == sorted(OVERRIDES)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs_and_with_a_parameters_cell(name):
    nb = _load(name)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: cell {i} has stored outputs (clear them before committing)"
            assert cell.execution_count is None, f"{name}: cell {i} has an execution count"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters'"
    assert "colab-badge.svg" in nb.cells[0].source and "Written for:" in nb.cells[0].source
    assert "detect_runtime" in nb.cells[1].source, f"{name}: the first code cell must be the install cell"


def _inject(nb, name: str):
    """A copy of the notebook with the CI parameters cell right after the `parameters` cell."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell(f'# injected by tests/notebooks\nSIZE = "small"\n'
                                     f"OVERRIDES = {OVERRIDES[name]!r}")
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    return nb


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """JUPYTER_PATH with a kernelspec running this interpreter; restored afterwards."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / _KERNEL
    spec_dir.mkdir(parents=True)
    env = {"JAX_PLATFORMS": "cpu", "JAXINFER_PROGRESS": "0", "PYTHONUNBUFFERED": "1",
           "JAXINFER_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxinfer tests", "language": "python", "env": env}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root) + (os.pathsep + old if old else "")
    yield env
    if old is None:
        del os.environ["JUPYTER_PATH"]
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.mark.notebooks
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_cpu(name, kernel_env):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    nb = _inject(_load(name), name)
    client = NotebookClient(nb, kernel_name=_KERNEL, timeout=TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": _DIR}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{name}: a cell failed:\n{str(e)[-4000:]}")
    seconds = time.perf_counter() - start
    print(f"{name}: {seconds:.1f} s")
    assert seconds < TIMEOUT_S, f"{name} took {seconds:.0f} s, over its {TIMEOUT_S} s budget"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)  # every cell ran
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
