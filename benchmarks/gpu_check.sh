#!/usr/bin/env bash
# The first thing to run on a GPU machine (benchmarks/gpu_notes.md says how to get there).
#
#   bash benchmarks/gpu_check.sh [OUTDIR]          # every stage; logs and tables in OUTDIR
#   GPU_CHECK_STAGES=env,tests bash benchmarks/gpu_check.sh
#   GPU_CHECK_APPEND=1 bash benchmarks/gpu_check.sh   # benchmark tables into benchmarks/README.md
#
# Stages, in order (each logs to OUTDIR/<stage>.log; a failing stage does not stop the rest,
# and the script exits non-zero if any failed):
#   env        driver, CUDA, CuPy, NVRTC, cuBLAS, cuDNN, NCCL versions; cuda_available() and why not
#   tests      python -m pytest -m gpu -x (every GPU case of the suite)
#   repeat     one small-VGG training step per conv algorithm, twice: bitwise equal? equal to the CPU?
#   sanitizer  compute-sanitizer memcheck, racecheck, initcheck on one step (if the tool is there)
#   bench      bench_layers (every conv algorithm) and bench_step, TF32 off and on,
#              cudnn.benchmark set on PyTorch's side in both
# Without a GPU, every stage after `env` says "skipped: no GPU" and the script exits 0.
# GPU_CHECK_SANITIZER_TOOLS picks compute-sanitizer's tools (default: all three).
# GPU_CHECK_STAGE_TIMEOUT (seconds, default 900) bounds each command; GPU_CHECK_PYTEST_ARGS
# (default -x) replaces pytest's -x, e.g. with "--maxfail=50" to see every failure at once.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUTDIR=${1:-gpu_check_out}
STAGES=${GPU_CHECK_STAGES:-env,tests,repeat,sanitizer,bench}
LIMIT=${GPU_CHECK_STAGE_TIMEOUT:-900}
APPEND=${GPU_CHECK_APPEND:+--append}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
failed=()

run() {  # run STAGE CMD...: log to OUTDIR/STAGE.log (appending) and the terminal
    local stage=$1; shift
    echo "+ $*" | tee -a "$OUTDIR/$stage.log"
    timeout "$LIMIT" "$@" 2>&1 | tee -a "$OUTDIR/$stage.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "!! $stage: '$*' exited $rc" | tee -a "$OUTDIR/$stage.log"
        failed+=("$stage: $*")
    fi
    return "$rc"
}

want() { [[ ",$STAGES," == *",$1,"* ]]; }

echo "== env"
want env && {
    run env "$PY" benchmarks/gpu_check.py env
    command -v nvidia-smi >/dev/null && run env nvidia-smi
    command -v nvcc >/dev/null && run env nvcc --version
}
if ! "$PY" -c "import sys, minivgg; sys.exit(0 if minivgg.cuda_available() else 1)"; then
    echo "skipped: no GPU visible to CuPy; every stage after env needs one (see env above)"
    exit 0
fi

echo "== tests"
want tests && run tests "$PY" -m pytest -m gpu ${GPU_CHECK_PYTEST_ARGS:--x} -q -rs \
    -p no:cacheprovider

echo "== repeat"
want repeat && run repeat "$PY" benchmarks/gpu_check.py repeat

echo "== sanitizer"
if want sanitizer; then
    if command -v compute-sanitizer >/dev/null; then
        # blocked.cu's shared-memory tiles are racecheck's to judge, once "blocked" is an
        # algorithm (issue 26)
        algos=$("$PY" -c "from minivgg.backend import CONV_ALGORITHMS as A; print(','.join(
            a for a in ('im2col', 'winograd4', 'direct', 'blocked') if a in A))")
        for tool in ${GPU_CHECK_SANITIZER_TOOLS:-memcheck racecheck initcheck}; do
            # NOTE: one step of im2col and of winograd4 (the kernels that index the most);
            # CuPy's pool hands out recycled blocks, so initcheck only sees minivgg's kernels
            # read memory no one wrote if the pool is bypassed (CUPY_GPU_MEMORY_LIMIT does not
            # do that; the malloc allocator below does).
            run sanitizer compute-sanitizer --tool "$tool" --error-exitcode 9 \
                --print-limit 20 "$PY" benchmarks/gpu_check.py repeat --steps 1 \
                --algos "$algos" --no-pool
        done
    else
        echo "skipped: compute-sanitizer is not on the PATH" | tee -a "$OUTDIR/sanitizer.log"
    fi
fi

echo "== bench"
if want bench; then
    for tf32 in off on; do
        run bench "$PY" benchmarks/bench_layers.py --device cuda --batch 64 --tf32 "$tf32" \
            --algo all $APPEND
        run bench "$PY" benchmarks/bench_step.py --device cuda --tf32 "$tf32" $APPEND
    done
fi

[ -n "$APPEND" ] && cp benchmarks/README.md "$OUTDIR/benchmarks_README.md"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all stages passed"
