#!/usr/bin/env bash
# The GPU check: core tests, batch parity and decode/batch speed beside mlx-lm, on MLX's GPU.
#
#   bash benchmarks/gpu_check.sh            # on a machine with MLX's CUDA (or Metal) backend
#   bash benchmarks/gpu_check.sh --tiny     # the same steps on a tiny shape: checks the plumbing
#
# Models are random-weight bf16 models of real shapes (benchmarks/random_model.py), so nothing
# is downloaded. PYTHON (default python3), SHAPES, TOKENS, REPEATS and SIZES override the
# defaults below. Run it from the source tree with layerdecode installed
# (pip install -e ".[cuda]" or ".[dev]" plus mlx-cuda).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [[ "${1:-}" == "--tiny" ]]; then
    SHAPES=${SHAPES:-tiny} TOKENS=${TOKENS:-16} REPEATS=${REPEATS:-1} SIZES=${SIZES:-4}
    TESTS=(tests/test_confident_scan.py)
    DTYPE=float32
else
    SHAPES=${SHAPES:-"qwen1.5b llama8b"} TOKENS=${TOKENS:-256} REPEATS=${REPEATS:-3}
    SIZES=${SIZES:-16,64}
    TESTS=(tests/test_generation.py tests/test_strategies.py tests/test_batch.py
        tests/test_adapters_taps.py tests/test_confident_scan.py)
    DTYPE=bfloat16
fi

step() { printf '\n== %s\n' "$*"; }

step "MLX and its device"
$PY -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.device_info())"
if [[ "${1:-}" != "--tiny" ]] && ! $PY -c "import mlx.core as mx, sys; sys.exit(mx.default_device() != mx.gpu)"; then
    echo "MLX has no GPU here: install MLX's CUDA backend (pip install \"layerdecode[cuda]\") or pass --tiny." >&2
    exit 2
fi

step "core tests"
$PY -m pytest -q -p no:cacheprovider "${TESTS[@]}" || echo "!! some tests failed (see above)"

step "batched rows against single runs, mlx-lm and layerdecode"
$PY benchmarks/batch_parity.py

for shape in $SHAPES; do
    step "single stream, $shape ($DTYPE), $TOKENS tokens, $REPEATS rounds"
    $PY benchmarks/bench_decode.py --random "$shape" --dtype "$DTYPE" --tokens "$TOKENS" \
        --repeats "$REPEATS" --strategies final,confident-lazy,confident-eager,dola
    step "batched, $shape ($DTYPE), batch sizes $SIZES, $((TOKENS / 2)) tokens per row"
    $PY benchmarks/bench_batch.py --random "$shape" --dtype "$DTYPE" --tokens $((TOKENS / 2)) \
        --sizes "$SIZES" --scans eager,lazy
done
