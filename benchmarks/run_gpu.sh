#!/usr/bin/env bash
# The GPU checks and benchmarks behind benchmarks/RESULTS.md's GPU sections, in one short run:
# the Triton-kernel tests on the device, the launch-configuration sweep, bench_optim (few large
# tensors at 3 sizes; thousands of small ones; 1 vs 1000 groups) and the GPT benchmarks.
# Each stage has its own time limit and log, so one failure leaves the others' figures.
#
#   OUT=/tmp/gpu bash benchmarks/run_gpu.sh [STAGE...]   # stages: tests tune few gpt many (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mupkit-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stages=("${@:-tests tune few gpt many}")
stages=(${stages[*]})

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name exit $? ($(date +%T))"
    tail -n 4 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for s in "${stages[@]}"; do
    case $s in
        tests) stage tests 110 python3 -m pytest -o addopts="" -q -p no:cacheprovider -rf --tb=short -n 4 \
                   tests/test_kernels.py tests/test_default_paths.py ;;
        tune) stage tune 45 python3 benchmarks/tune_kernels.py ;;
        few) stage few 70 python3 benchmarks/bench_optim.py --sizes 1e6 2e7 1e8 --regimes few --windows 3 \
                 --steps 10 --sections time memory ;;
        gpt) stage gpt 90 bash -c "cd benchmarks && python3 bench_scale_invariant.py && python3 bench_dadapt.py \
                 && python3 bench_scaled_adam.py" ;;
        many) stage groups 60 python3 benchmarks/bench_optim.py --sizes 2e7 --windows 3 --steps 3 --sections groups \
                  --only fused default
              stage many 90 python3 benchmarks/bench_optim.py --sizes 2e7 --regimes many --windows 3 --steps 3 \
                  --sections time --only fused default ;;
        *) echo "unknown stage $s (tests tune few gpt many)"; exit 2 ;;
    esac
done
