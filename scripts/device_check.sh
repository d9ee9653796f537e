#!/usr/bin/env bash
# The checks that need a real GPU or TPU, in one run of under 8 minutes, every figure as JSON.
#
#   scripts/device_check.sh OUT_DIR
#
# Works unchanged on an NVIDIA GPU machine (H100 / H200) and on a TPU VM; on a machine
# with neither it says so and runs only what makes sense (the benchmarks' CPU rows).
# Steps, each under its own time limit, each recorded in OUT_DIR/summary.json (status,
# seconds) whether it passed, failed or was skipped:
#   1. setup: jax's backend and versions; what is missing is installed when the package
#      index is reachable (jaxinfer itself is used from this checkout via PYTHONPATH);
#   2. kernels: tests/pallas/test_device_kernels.py, every Pallas kernel compiled on the
#      device (impl="pallas") against the XLA reference at real-model shapes;
#   3. benchmark_kernels.py: paged attention, plain vs shared prefix vs jax's own kernel;
#   4. benchmark_latency.py: batch-1 prefill and decode, bfloat16, 125M and 1B presets;
#   5. benchmark_int4.py: int4 weight-only matmul vs dense at M = 1, 16, 64, 256.
# The figures go to BUILD.md ("Measured on a GPU") by hand, with the date and machine.
set -uo pipefail

OUT=${1:?usage: scripts/device_check.sh OUT_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export JAXINFER_COMPILATION_CACHE_DIR=""   # every compile is measured, nothing is reused
LOG="$OUT/device_check.log"
: >"$LOG"
STEPS=()

step() {  # step NAME LIMIT_S CMD...: runs CMD with a time limit, records status and seconds
  local name=$1 limit=$2
  shift 2
  local start end rc status
  start=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  end=$(date +%s)
  case $rc in 0) status=passed ;; 124) status=timed_out ;; *) status="failed (rc $rc)" ;; esac
  echo "=== $name: $status in $((end - start)) s" | tee -a "$LOG"
  STEPS+=("{\"step\": \"$name\", \"status\": \"$status\", \"seconds\": $((end - start))}")
}

skip() {
  echo "=== $1: skipped ($2)" | tee -a "$LOG"
  STEPS+=("{\"step\": \"$1\", \"status\": \"skipped: $2\", \"seconds\": 0}")
}

have() { "$PY" -c "import $1" >/dev/null 2>&1; }

# 1. setup ------------------------------------------------------------------------------
ACCEL=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ACCEL=gpu
elif ls /dev/accel* >/dev/null 2>&1 || ls /dev/vfio/* >/dev/null 2>&1; then
  ACCEL=tpu
fi
echo "accelerator: $ACCEL" | tee -a "$LOG"
install() {  # best effort: the machine may have no package index
  timeout 120 "$PY" -m pip install --quiet --disable-pip-version-check --retries 0 --timeout 10 "$@" >>"$LOG" 2>&1 \
    || echo "pip install $* failed (no package index?); continuing with what is installed" | tee -a "$LOG"
}
BACKEND=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none)
if [ "$BACKEND" != "$ACCEL" ] && [ "$ACCEL" != cpu ]; then
  if [ "$ACCEL" = gpu ]; then install "jax[cuda12]>=0.10.2,<0.12"; else install "jax[tpu]>=0.10.2,<0.12"; fi
  BACKEND=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none)
fi
for mod in flax:flax optax:optax orbax.checkpoint:orbax-checkpoint absl:absl-py tokenizers:tokenizers \
           sentencepiece:sentencepiece ml_dtypes:ml_dtypes tqdm:tqdm pytest:pytest; do
  have "${mod%%:*}" || install "${mod##*:}"
done
"$PY" - >"$OUT/environment.json" 2>>"$LOG" <<'EOF'
import json, platform
info = {"python": platform.python_version(), "platform": platform.platform()}
try:
    import jax, jaxlib
    info.update(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
                devices=[str(d) for d in jax.devices()], device_kind=jax.devices()[0].device_kind)
except Exception as e:  # noqa: BLE001
    info["jax_error"] = repr(e)
print(json.dumps(info, indent=2))
EOF
cat "$OUT/environment.json" | tee -a "$LOG"
echo "jax backend: $BACKEND" | tee -a "$LOG"

# 2. the compiled kernels against the reference ---------------------------------------------
if [ "$BACKEND" = gpu ] || [ "$BACKEND" = tpu ]; then
  if have pytest; then
    step kernels 150 "$PY" -m pytest -q -p no:cacheprovider tests/pallas/test_device_kernels.py \
      --junitxml="$OUT/device_kernels.xml" -o addopts=""
  else
    skip kernels "pytest is not installed and could not be"
  fi
else
  skip kernels "no GPU or TPU backend (jax says $BACKEND)"
fi

# 3-5. benchmarks -------------------------------------------------------------------------
step benchmark_kernels 90 "$PY" scripts/benchmark_kernels.py --batch 8,64 --context 2048 \
  --prefix_fraction 0,0.9 --q_lens 1 --repeats 10 --json_out "$OUT/kernels.json"
for preset in 125m 1b; do
  limit=80; [ "$preset" = 1b ] && limit=150   # 1b: writes and loads 5 GB of random float32 weights first
  step "benchmark_latency_$preset" "$limit" "$PY" scripts/benchmark_latency.py --preset "$preset" --dtype bfloat16 \
    --skip_hf --prompt_len 128 --output_len 64 --repeats 3 --work_dir "/tmp/jaxinfer_bench" \
    --json_out "$OUT/latency_$preset.json"
done
step benchmark_int4 50 "$PY" scripts/benchmark_int4.py --m 1,16,64,256 --k 4096 --n 4096 --repeats 20 \
  --json_out "$OUT/int4.json"

# summary ----------------------------------------------------------------------------------
{
  echo "{\"accelerator\": \"$ACCEL\", \"backend\": \"$BACKEND\", \"steps\": ["
  for i in "${!STEPS[@]}"; do
    [ "$i" -gt 0 ] && echo ","
    echo "  ${STEPS[$i]}"
  done
  echo "]}"
} >"$OUT/summary.json"
cat "$OUT/summary.json"
