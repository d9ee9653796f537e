"""Cold and warm start: seconds from process start to the first generated token.

    python scripts/benchmark_startup.py [--preset 125m | --model tiny-code] [--runs 2] [--output FILE.json] \
        [--plot FILE.png]

Each run is a fresh Python process (imports, jax start-up, weight load, compiles, then
one streamed request of --prompt_len tokens), timed from just before the process is
spawned to the first token it streams. The first run ("cold") gets an empty
compilation cache folder; every later run ("warm": the folder has entries) reuses it, so its step
programs come from jax's persistent compilation cache, and with --warmup profile it
first compiles what the earlier runs recorded (InferenceSession.warmup), as `serve`
does before reporting ready. Reported per run: import, load, warm-up and
first-token seconds (all since spawn), compiles after the warm-up, and the decode
tokens that followed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_MODEL = flags.DEFINE_string("model", None, "Model folder or bundled name (default: the --preset's random model).")
_PRESET = flags.DEFINE_enum("preset", "125m", ["125m", "tiny"], "Random Llama-shaped model when --model is unset.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Where the preset's folder is built (default: a temp folder).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
_OUTPUT_LEN = flags.DEFINE_integer("output_len", 8, "Generated tokens (the first one is what is timed).")
_RUNS = flags.DEFINE_integer("runs", 2, "Processes: the first cold, the others warm.")
_WARMUP = flags.DEFINE_enum("warmup", "profile", ["profile", "none"],
                            "Before the request: warm the programs earlier runs recorded, or nothing.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Compilation cache folder (default: a new temp folder, so "
                                 "the first run is cold).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")
_PLOT = flags.DEFINE_string("plot", None, "Draw the phases of each run as stacked bars here (PNG; needs matplotlib).")
_CHILD = flags.DEFINE_float("child_spawned_at", None, "Internal: run one timed start (time.time() at spawn).")


def _child(spawned_at: float) -> dict:
    import jaxinfer  # noqa: F401 - the import is part of what is timed
    from jaxinfer import EngineConfig, InferenceSession, SamplingParams
    imported = time.time() - spawned_at
    session = InferenceSession.from_pretrained(_MODEL.value, engine=EngineConfig(
        num_pages=64, max_num_seqs=4, max_num_batched_tokens=128, compilation_cache_dir=_CACHE_DIR.value))
    loaded = time.time() - spawned_at
    report = session.warmup(grid=False, progress=False) if _WARMUP.value == "profile" else {}
    warmed = time.time() - spawned_at
    compiles_before = session.metrics()["num_compiles"]
    params = SamplingParams(max_tokens=_OUTPUT_LEN.value, temperature=0.0, ignore_eos=True)
    first = None
    for _ in session.stream(list(range(3, 3 + _PROMPT_LEN.value)), params, output="deltas"):
        if first is None:
            first = time.time() - spawned_at
    done = time.time() - spawned_at
    metrics = session.metrics()
    session.close()
    return {"import_s": imported, "load_s": loaded, "warmup_s": warmed, "first_token_s": first, "done_s": done,
            "warmup_programs": report.get("programs", 0), "compiles_after_warmup": metrics["num_compiles"],
            "compiles_before_request": compiles_before, "compile_seconds": metrics["compile_seconds"]}


def main(argv):
    del argv
    if _CHILD.value is not None:
        print("RESULT " + json.dumps(_child(_CHILD.value)), flush=True)
        return 0
    model = _MODEL.value
    if model is None:
        import bench_common
        folder = _MODEL_DIR.value or os.path.join(tempfile.gettempdir(), f"jaxinfer-bench-{_PRESET.value}")
        model = bench_common.build_random_llama(_PRESET.value, folder)
    cache_dir = _CACHE_DIR.value or tempfile.mkdtemp(prefix="jaxinfer-startup-cache-")
    runs = []
    for i in range(_RUNS.value):
        args = [sys.executable, os.path.abspath(__file__), f"--model={model}", f"--cache_dir={cache_dir}",
                f"--prompt_len={_PROMPT_LEN.value}", f"--output_len={_OUTPUT_LEN.value}",
                f"--warmup={_WARMUP.value}"]
        kind = "warm" if os.path.isdir(cache_dir) and any(os.scandir(cache_dir)) else "cold"
        spawned_at = time.time()
        proc = subprocess.run(args + [f"--child_spawned_at={spawned_at!r}"], capture_output=True, text=True,
                              timeout=1800)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise RuntimeError(f"run {i} failed with exit code {proc.returncode}")
        result = {"run": i, "kind": kind,
                  **json.loads(lines[-1][len("RESULT "):])}
        runs.append(result)
        print(f"{result['kind']:>4}: import {result['import_s']:.2f} s | loaded {result['load_s']:.2f} s | "
              f"warm-up done {result['warmup_s']:.2f} s ({result['warmup_programs']} programs) | first token "
              f"{result['first_token_s']:.2f} s | {_OUTPUT_LEN.value} tokens {result['done_s']:.2f} s | compiles "
              f"after warm-up {result['compiles_after_warmup']} ({result['compile_seconds']:.2f} s)", flush=True)
    report = {"model": model, "prompt_len": _PROMPT_LEN.value, "output_len": _OUTPUT_LEN.value,
              "warmup": _WARMUP.value, "cache_dir": cache_dir, "runs": runs}
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(report, f, indent=2)
    if _PLOT.value:
        import plotting
        plotting.plot_startup(report, _PLOT.value)
    return 0


if __name__ == "__main__":
    app.run(main)
