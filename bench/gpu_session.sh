#!/usr/bin/env bash
# One batched GPU validation run (the GPU issues' checklist), for a lent H100/H200 where device
# minutes are scarce: every step writes its log under $OUT and a failing step doesn't stop the
# rest. Usage, from the repository root on the GPU machine:
#     OUT=/some/dir bash bench/gpu_session.sh [quick]
# "quick" runs the tests and the small benchmark only (a few minutes).
set -u
OUT=${OUT:-bench/results/gpu-session-$(date +%Y-%m-%d)}
mkdir -p "$OUT"
quick=${1:-}

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.txt, record the exit status
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$OUT/steps.txt"
    local start=$SECONDS
    "$@" >"$OUT/$name.txt" 2>&1
    echo "   exit $? after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}

step install pip install --no-deps -e .
step nvidia-smi nvidia-smi
step versions python -c "
import torch, numba, numba.cuda, importlib.metadata as m
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())
print('numba', numba.__version__, 'numba-cuda', m.version('numba-cuda'))
print('device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())
import fastrnn.recurrence_cuda as r; print('fastrnn cuda:', r.unavailable_reason() or 'available')
"
# Parity against cuDNN (the `cuda` tests), then the whole suite (CPU tests run there too).
step pytest-cuda python -m pytest tests -q -m cuda -p no:cacheprovider
step bench-small python -m bench --device cuda --out "$OUT" --no-progress
if [ "$quick" = quick ]; then
    exit 0
fi
step pytest-all python -m pytest tests -q -p no:cacheprovider -x
for strategy in persistent stepwise; do
    step "bench-standard-$strategy" python -m bench --device cuda --sizes standard \
        --cuda-strategy "$strategy" --out "$OUT" --no-progress
done
step bench-standard-auto-bi python -m bench --device cuda --sizes standard --bidirectional \
    --layers 2 --out "$OUT" --no-progress
step bench-packed python -m bench --device cuda --sizes standard --packed --out "$OUT" \
    --no-progress
for dtype in float16 bfloat16; do
    step "bench-standard-$dtype" python -m bench --device cuda --sizes standard --dtype "$dtype" \
        --out "$OUT" --no-progress
done
# Memory errors and races in the kernels at a small size (forward and backward of each cell).
if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck initcheck; do
        step "sanitizer-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
            python -m pytest tests/test_cuda_kernels.py -q -m cuda -p no:cacheprovider \
            -k "test_gpu_matches_cudnn and not packed and not proj"
    done
fi
