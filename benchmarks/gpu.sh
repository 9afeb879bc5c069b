#!/usr/bin/env bash
# The throughput benchmark on a GPU machine (made for one NVIDIA H200), as one
# prepared script of about 8 minutes. Run from anywhere in the repository:
#
#     OUT=/some/folder bash benchmarks/gpu.sh     # OUT defaults to ./gpu-out
#
# 1. Python: the first of python3 that already runs JAX on the GPU (images made
#    for GPUs often ship jax with its CUDA plugin; jaxnn then comes from the
#    source tree through PYTHONPATH, nothing installed), else a fresh venv
#    (/tmp/jaxnn-gpu-venv) with `pip install -e . "jax[cuda13]"`, falling back to
#    "jax[cuda12]" (needs PyPI). It stops there if JAX sees no GPU.
# 2. nvidia-smi, the Python, JAX's version and devices: gpu-setup.log.
# 3. throughput.py, MNIST MLP batch 32 (full 60,000-sample epochs, 5 timed after
#    one warm-up), jaxnn vs plain JAX vs the hand-fused scan, float32:
#    gpu-mlp.json / gpu-mlp.log.
# 4. The same with --dtype bfloat16 (mixed precision): gpu-mlp-bf16.json / .log.
# 5. population.py, fit_many at K = 1, 16, 64, 256 (one timed epoch after a
#    warm-up, beside one jaxnn.fit): gpu-population.json / .log.
#
# 6. examples/mnist_distributed.py over every device (devices="all"): gpu-distributed.log.
#
# Random data of MNIST's shapes (--random-data, random IDX files) throughout: the GPU machine has
# no MNIST files and no network, and throughput does not depend on the values.
# Each step has its own time limit, so one that hangs cannot eat the others'.
# Everything goes to $OUT (7 files); the exit status is the number of steps that
# failed.
#
# A dry run of the script elsewhere (a CPU, say): JAXNN_GPU_PYTHON=PATH uses that
# Python, GPU or not, and JAXNN_GPU_QUICK=1 adds --quick to every step.

set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
SETUP_LOG="$OUT/gpu-setup.log"
: >"$SETUP_LOG"
failed=0

say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$SETUP_LOG"; }

gpu_jax() {  # does this Python run JAX on a GPU?
    "$1" - <<'EOF' >>"$SETUP_LOG" 2>&1
import sys
import jax
devices = jax.devices()
print(sys.executable, "jax", jax.__version__, devices)
sys.exit(0 if any(d.platform == "gpu" for d in devices) else 1)
EOF
}

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it, output to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    say "$name: $*"
    if timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
        say "$name: done"
    else
        say "$name: FAILED or timed out (limit $limit s)"
        failed=$((failed + 1))
    fi
}

say "nvidia-smi"
nvidia-smi 2>&1 | tee -a "$SETUP_LOG" || say "nvidia-smi not found"

PY=""
if [ -n "${JAXNN_GPU_PYTHON:-}" ]; then
    PY=$JAXNN_GPU_PYTHON
    gpu_jax "$PY" || say "WARNING: $PY runs JAX on no GPU (JAXNN_GPU_PYTHON: a dry run)"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif command -v python3 >/dev/null && gpu_jax python3; then
    PY=$(command -v python3)
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    say "using $PY (JAX on the GPU already), jaxnn from the source tree"
else
    VENV=/tmp/jaxnn-gpu-venv
    say "no python3 with JAX on the GPU: making $VENV"
    python3 -m venv "$VENV" >>"$SETUP_LOG" 2>&1
    for extra in cuda13 cuda12; do
        say "pip install -e . jax[$extra]"
        if timeout 240 "$VENV/bin/python" -m pip install -q --retries 1 --timeout 20 \
                -e . "jax[$extra]" >>"$SETUP_LOG" 2>&1 && gpu_jax "$VENV/bin/python"; then
            PY=$VENV/bin/python
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    say "STOP: no Python with JAX on a GPU (see $SETUP_LOG); nothing measured"
    exit 1
fi
"$PY" -c "import jax, jaxlib, optax, numpy, jaxnn; print('jax', jax.__version__, 'jaxlib', \
jaxlib.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__, 'jaxnn', \
jaxnn.__version__, jaxnn.__file__)" 2>&1 | tee -a "$SETUP_LOG"

QUICK=()
[ "${JAXNN_GPU_QUICK:-0}" = 1 ] && QUICK=(--quick)
MLP=(benchmarks/throughput.py --models mlp32 --frameworks jaxnn,jax,jax-scan --epochs 5
     --random-data --timeout 120 "${QUICK[@]}")
step gpu-mlp 170 "$PY" "${MLP[@]}" --json "$OUT/gpu-mlp.json"
step gpu-mlp-bf16 170 "$PY" "${MLP[@]}" --dtype bfloat16 --json "$OUT/gpu-mlp-bf16.json"
step gpu-population 150 "$PY" benchmarks/population.py --k 1,16,64,256 --random-data \
    "${QUICK[@]}" --json "$OUT/gpu-population.json"
# The distributed example over every device of the machine (devices="all"), on
# random IDX files of MNIST's shapes (no MNIST files, no network there).
RANDOM_MNIST="$OUT/random-mnist"
step gpu-random-mnist 60 "$PY" -c "
import pathlib, sys, numpy as np
from jaxnn.datasets import write_idx
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for split, n in (('train', 60000), ('t10k', 10000)):
    write_idx(out / f'{split}-images-idx3-ubyte.gz', rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    write_idx(out / f'{split}-labels-idx1-ubyte.gz', rng.integers(0, 10, n, dtype=np.uint8))
" "$RANDOM_MNIST"
step gpu-distributed 150 "$PY" examples/mnist_distributed.py --devices all --epochs 2 \
    --data-dir "$RANDOM_MNIST" --json

say "finished: $failed step(s) failed"
exit "$failed"
