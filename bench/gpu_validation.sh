#!/usr/bin/env bash
# One GPU validation run of fastrnn's CUDA kernels against cuDNN, for a lent H100/H200 where one
# call has at most 10 minutes: toolchain check, parallel precompile, the `cuda` tests (one process
# each), parity against cuDNN, the benchmark grid, compute-sanitizer last. Every step has its own
# timeout and log; a failing step doesn't stop the rest, except a failed toolchain check, after
# which nothing could run. Results: one tarball and summary.md under $OUT; the tables on stdout.
#
#     OUT=/some/dir bash bench/gpu_validation.sh            # from the repository root
#     bash bench/gpu_validation.sh --dry-run                # print the steps, run nothing
#
# No install: the checkout runs from PYTHONPATH=. with python3 (the interpreter that has torch).
set -u
cd "$(dirname "$0")/.." || exit 2

dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
OUT=${OUT:-/tmp/fastrnn-gpu-$(date +%Y%m%d-%H%M%S)}
RESULTS="$OUT/results"
mkdir -p "$RESULTS"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-${TMPDIR:-/tmp}/fastrnn-numba-cache}
JOBS=$(nproc 2>/dev/null || echo 4)
# Seconds the whole run may take (a call on the GPU machine ends at 600): each step's timeout is
# cut to what is left, a step with under 20 s left is skipped, and the tarball is still written.
BUDGET=${BUDGET:-540}
PY=${GPU_VALIDATION_PYTHON:-python3}
START=$SECONDS
FAILED=0 # steps that failed, timed out or were skipped: the script's exit status is 1 if any
: >"$RESULTS/steps.tsv"

# step NAME SECONDS COMMAND...: run with a timeout, log to $RESULTS/NAME.log, record the status
left() { echo $((BUDGET - (SECONDS - START))); }
step() {
    local name=$1 limit=$2
    shift 2
    if [ "$dry" = 1 ]; then
        echo "[dry-run] $name (timeout ${limit}s): $*"
        return 0
    fi
    if [ "$(left)" -lt 20 ]; then
        echo "== $name: skipped, $(left) s of the ${BUDGET} s budget left"
        printf '%s\tskipped (no time)\t0\n' "$name" >>"$RESULTS/steps.tsv"
        FAILED=$((FAILED + 1))
        return 1
    fi
    [ "$limit" -gt "$(($(left) - 10))" ] && limit=$(($(left) - 10))
    echo "== $name (timeout ${limit}s, $((SECONDS - START)) s so far): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    local code=$?
    [ "$code" = 124 ] && echo "   TIMED OUT after ${limit}s" | tee -a "$RESULTS/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - start))" >>"$RESULTS/steps.tsv"
    [ "$code" = 0 ] || FAILED=$((FAILED + 1))
    echo "   exit $code after $((SECONDS - start)) s"
    tail -n 3 "$RESULTS/$name.log" | sed 's/^/   | /'
    return "$code"
}

finish() {
    if [ "$dry" = 1 ]; then
        echo "[dry-run] summary + tarball $OUT/fastrnn-gpu-results.tar.gz"
        return
    fi
    $PY -m bench.gpu_check summary "$RESULTS" >"$OUT/summary.md" 2>>"$RESULTS/summary.log"
    cp "$OUT/summary.md" "$RESULTS/summary.md" 2>/dev/null
    tar -czf "$OUT/fastrnn-gpu-results.tar.gz" -C "$OUT" results
    echo
    cat "$OUT/summary.md"
    echo
    echo "results: $OUT/fastrnn-gpu-results.tar.gz, $OUT/summary.md ($((SECONDS - START)) s in all)"
}

# 1. The toolchain, in ~20 s: without a GPU (or NVVM, libdevice, libcudadevrt, cooperative
#    launches) nothing below can run, so stop here with the reason.
# (GPU_VALIDATION_NO_DEVICE_CHECK=1 skips this test, to try the script's control flow without a GPU)
if [ "$dry" = 0 ] && [ -z "${GPU_VALIDATION_NO_DEVICE_CHECK:-}" ] \
    && ! command -v nvidia-smi >/dev/null && [ ! -e /dev/nvidiactl ]; then
    echo "gpu_validation: no NVIDIA GPU here (no nvidia-smi, no /dev/nvidiactl); nothing to run." >&2
    echo "Run it on the GPU machine; 'bash bench/gpu_validation.sh --dry-run' lists the steps." >&2
    exit 3
fi
step nvidia-smi 15 nvidia-smi
if ! step toolchain 45 $PY -m bench.gpu_check toolchain; then
    echo "gpu_validation: the toolchain check failed (see $RESULTS/toolchain.log); stopping." >&2
    finish
    exit 1
fi

# 2. Compile every kernel signature into Numba's disk cache, on all cores at once.
step precompile 120 $PY -m bench.gpu_check precompile --jobs "$JOBS"

# 3. The `cuda` tests, one process per test (a fault poisons only its own CUDA context),
#    several at a time.
if [ "$dry" = 1 ]; then
    echo "[dry-run] pytest-cuda: each test of 'pytest tests -m cuda' in its own process"
else
    $PY -m pytest tests -m cuda -q -p no:cacheprovider --collect-only 2>"$RESULTS/collect.err" \
        | grep '::' >"$RESULTS/cuda-tests.txt"
    echo "== pytest-cuda: $(wc -l <"$RESULTS/cuda-tests.txt") tests, 6 processes at a time"
    start=$SECONDS
    mkdir -p "$RESULTS/pytest"
    : >"$RESULTS/pytest-status.txt"
    # shellcheck disable=SC2016
    limit=150
    [ "$limit" -gt "$(($(left) - 10))" ] && limit=$(($(left) - 10))
    [ "$limit" -lt 1 ] && limit=1
    timeout "$limit" xargs -a "$RESULTS/cuda-tests.txt" -d '\n' -P 6 -I{} bash -c '
        name=$(echo "$1" | tr -c "A-Za-z0-9_.-" "_" | cut -c1-150)
        timeout --kill-after=5 120 python3 -m pytest "$1" -q -p no:cacheprovider \
            >"$2/pytest/$name.log" 2>&1
        code=$?
        echo "$code $1" >>"$2/pytest-status.txt"' _ {} "$RESULTS"
    passed=$(grep -c '^0 ' "$RESULTS/pytest-status.txt" 2>/dev/null)
    total=$(wc -l <"$RESULTS/pytest-status.txt" 2>/dev/null || echo 0)
    collected=$(wc -l <"$RESULTS/cuda-tests.txt")
    if [ "$collected" = 0 ]; then
        echo "   no cuda test collected: see $RESULTS/collect.err"
    fi
    [ "$passed" = "$collected" ] && [ "$collected" != 0 ] || FAILED=$((FAILED + 1))
    total="$total run, $collected collected"
    printf 'pytest-cuda\t%s\t%s\n' "$passed passed of $total" "$((SECONDS - start))" \
        >>"$RESULTS/steps.tsv"
    echo "   $passed passed of $total, after $((SECONDS - start)) s"
    grep -v '^0 ' "$RESULTS/pytest-status.txt" | sed 's/^/   FAILED (exit) /'
fi

# 4. Parity against cuDNN: float32 strict (TF32 off), then float16 / bfloat16.
step parity 90 $PY -m bench.gpu_check parity --out "$RESULTS"

# 5. The benchmark grid against cuDNN: T100, B 1/8/64, H 128-1024 (I = H), forward and fwd+bwd,
#    each strategy, and PyTorch's fastrnns default size (T100 B64 I512 H512).
GRID="100,1,128,128;100,8,128,128;100,64,128,128;100,1,256,256;100,8,256,256;100,64,256,256"
GRID="$GRID;100,1,512,512;100,8,512,512;100,64,512,512"
GRID="$GRID;100,1,1024,1024;100,8,1024,1024;100,64,1024,1024"
TIMING="--target-time 0.05 --min-reps 5 --max-reps 25 --warmup 2 --no-progress --no-plot"
for strategy in auto persistent stepwise; do
    # torch's kernels don't depend on fastrnn's strategy: profiled in the first run only
    profile=""
    [ "$strategy" != auto ] && profile="--no-cudnn-profile"
    # shellcheck disable=SC2086
    step "bench-$strategy" 80 $PY -m bench --device cuda --sizes "$GRID" --cuda-strategy "$strategy" \
        --out "$RESULTS" --name "bench-$strategy" $TIMING $profile
done
# shellcheck disable=SC2086
step bench-fastrnns-default 45 $PY -m bench --device cuda --sizes "100,64,512,512" \
    --out "$RESULTS" --name bench-fastrnns-default $TIMING

# 6. compute-sanitizer on fastrnn's kernels only (small sizes), last: memcheck, racecheck.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -z "$SANITIZER" ] && [ "$dry" = 0 ]; then
    echo "== compute-sanitizer: not found on PATH nor under /usr/local/cuda*/bin" \
        | tee "$RESULTS/sanitizer-missing.log"
    printf 'sanitizer\tnot found\t0\n' >>"$RESULTS/steps.tsv"
else
    for tool in memcheck racecheck; do
        step "sanitizer-$tool" 60 "${SANITIZER:-compute-sanitizer}" --tool "$tool" \
            --error-exitcode 1 $PY -m bench.gpu_check workload
    done
fi

# 7. One tarball and the summary.
finish
[ "$dry" = 1 ] || echo "gpu_validation: $FAILED step(s) failed, timed out or skipped"
[ "$FAILED" = 0 ]
