#!/usr/bin/env bash
# Every GPU test and benchmark behind benchmarks/RESULTS.md's GPU sections, in one call of < 8 min:
#   tests      the Triton-kernel tests on the device (tests/test_kernels.py, test_default_paths.py)
#   traffic    the pass-count tests (tests/test_kernel_traffic.py; they run in Triton's interpreter
#              on the CPU, CUDA hidden, so they check the same kernels' code)
#   tune       the launch-configuration sweep (tune_kernels.py)
#   bandwidth  every optimizer's fused kernel at 100M fp32 parameters (16 tensors): % of the streaming
#              bandwidth for its documented minimum bytes (docs/kernels.md) and time / torch's fused
#              AdamW (torch._fused_adamw_) time (bench_optim.py)
#   defaults   issue 21's acceptance: every default step vs its reference package, first step
#              separately, on the 8.4M, 16-large-tensor, 25M GPT and 4882-small-tensor models
#   groups     1 vs 1000 muP param groups (bench_optim.py)
# Optional (not in the default list): few, many (bench_optim's size sweep and small-tensor regime),
# gpt (bench_scale_invariant.py, bench_dadapt.py, bench_scaled_adam.py), muon (bench_muon.py: Muon's
# batched Newton-Schulz vs torch.optim.Muon on a width-1024, 12-layer GPT's hidden matrices).
# Each stage has its own time limit and log, so one failure leaves the others' figures; at the end
# $OUT/results.md collects the device, versions and every stage's table, ready for RESULTS.md.
#
#   OUT=/tmp/gpu bash benchmarks/run_gpu.sh [STAGE...]   # default: tests traffic tune bandwidth defaults groups
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mupkit-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stages=("${@:-tests traffic tune bandwidth defaults groups}")
stages=(${stages[*]})
PYTEST=(python3 -m pytest -o addopts="" -q -p no:cacheprovider -rfxX --tb=short)

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$rc" >"$OUT/$name.rc"
    echo "=== $name exit $rc ($(date +%T))"
    tail -n 4 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    | tee "$OUT/device.txt"
for s in "${stages[@]}"; do
    case $s in
        tests) stage tests 90 "${PYTEST[@]}" -n 4 tests/test_kernels.py tests/test_default_paths.py ;;
        traffic) stage traffic 40 env CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 "${PYTEST[@]}" \
                     tests/test_kernel_traffic.py ;;
        tune) stage tune 35 python3 benchmarks/tune_kernels.py ;;
        bandwidth) stage bandwidth 60 python3 benchmarks/bench_optim.py --sizes 1e8 --regimes few --windows 3 \
                       --steps 10 --sections time --only fused ;;
        defaults) stage defaults 170 python3 benchmarks/bench_defaults.py --models issue large gpt small \
                      --warmup 5 --windows 3 --steps 5 --json "$OUT/defaults.json" ;;
        groups) stage groups 45 python3 benchmarks/bench_optim.py --sizes 2e7 --windows 3 --steps 3 \
                    --sections groups --only fused default ;;
        few) stage few 70 python3 benchmarks/bench_optim.py --sizes 1e6 2e7 1e8 --regimes few --windows 3 \
                 --steps 10 --sections time memory ;;
        many) stage many 90 python3 benchmarks/bench_optim.py --sizes 2e7 --regimes many --windows 3 --steps 3 \
                  --sections time --only fused default ;;
        gpt) stage gpt 90 bash -c "cd benchmarks && python3 bench_scale_invariant.py && python3 bench_dadapt.py \
                 && python3 bench_scaled_adam.py" ;;
        muon) stage muon 60 bash -c "cd benchmarks && python3 bench_muon.py --width 1024 --depth 12 --steps 5" ;;
        *) echo "unknown stage $s (tests traffic tune bandwidth defaults groups few many gpt muon)"; exit 2 ;;
    esac
done

{   # the RESULTS.md-ready summary: markdown tables as printed, the rest as text blocks
    echo "### GPU run $(date +%F): $(head -n 1 "$OUT/device.txt")"
    echo; echo "$(tail -n 1 "$OUT/device.txt"); stages: ${stages[*]}"
    for s in "${stages[@]}"; do
        [ -f "$OUT/$s.log" ] || continue
        echo; echo "#### $s (exit $(cat "$OUT/$s.rc"))"; echo
        if [ "$s" = defaults ]; then
            grep -E '^\|' "$OUT/$s.log"
        elif [ "$s" = tests ] || [ "$s" = traffic ]; then
            echo '```'; grep -E '(passed|failed|error|XPASS|FAILED)' "$OUT/$s.log" | tail -n 20; echo '```'
        else
            echo '```'; tail -n 40 "$OUT/$s.log"; echo '```'
        fi
    done
} >"$OUT/results.md"
echo "=== summary: $OUT/results.md"
