#!/usr/bin/env bash
# The checks and figures that need a CUDA GPU, for the lent device machine (its python3 has torch,
# triton and transformers; the repo is used in place). One part per call keeps each under the
# device's 10-minute limit:
#   bash scripts/gpu_check.sh tests     # kernel tests + end-to-end fp16/bf16 parity, eager and graphs
#   bash scripts/gpu_check.sh kernels   # lmwrap bench kernels (+ --sweep, block sizes 16 and 256)
#   bash scripts/gpu_check.sh e2e       # Llama-3.1-8B-shaped, 1,000 ShareGPT-like requests vs transformers
# Full logs go to $OUT (the device tool brings them back), the tail of each to stdout.
set -u
case "${1:-}" in
    tests|kernels|e2e) ;;
    *) echo "usage: bash scripts/gpu_check.sh tests|kernels|e2e" >&2; exit 2 ;;
esac
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export LMWRAP_CACHE="${LMWRAP_CACHE:-$OUT/cache}"
PY=${PYTHON:-python3}
LMWRAP="$PY -m lmwrap_engine.cli"

step() {
    local name=$1
    shift
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $?"
    tail -n "${TAIL:-25}" "$OUT/$name.log"
}

{ nvidia-smi; $PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__,
transformers.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.log" 2>&1
tail -n 1 "$OUT/env.log"

case "${1:-}" in
    tests)
        # Compiling ~200 Triton kernel variants one after another would take most of the 10 minutes:
        # eight xdist workers (the device image has pytest-xdist and pytest-timeout) compile in parallel.
        step gpu_tests $PY -m pytest -q -m gpu -n 8 --timeout 300 --maxfail 10 \
            tests/test_kernels.py tests/test_cuda_engine.py ;;
    kernels)
        step bench_kernels $LMWRAP bench kernels --sweep
        step bench_kernels_bs16 $LMWRAP bench kernels --block-size 16
        step bench_kernels_bs256 $LMWRAP bench kernels --block-size 256 ;;
    e2e)
        step bench_8b $LMWRAP bench throughput --random-weights llama-3.1-8b --dtype bfloat16 \
            --num-requests 1000 --dataset sharegpt-like --max-batch-size 256 --hf-num-requests 64 --hf-batch-size 32 ;;
esac
