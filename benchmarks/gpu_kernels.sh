#!/usr/bin/env bash
# The GPU checks of kaon's Triton kernels (issue 9) in one go, sized for a 10-minute session.
#
#   bash benchmarks/gpu_kernels.sh [all|tests|bench] [OUTDIR]
#                                   (OUTDIR default: $OUT or benchmarks/gpu-out)
#
# "all" runs both phases (about 6-9 minutes with Triton's compilation); a session whose calls are
# limited to 10 minutes can run "tests" and "bench" as two calls.
#
# 1. tests/test_kernels.py on the GPU: every kernel against its reference rule on CUDA tensors,
#    the CUDA-graph capture of step() and the no-host-sync check (about 1 minute).
# 2. kaon bench --device cuda on the LLM-like, SDXL-like and LoRA-bag shape sets, bf16 weights
#    and gradients: step time, bytes a step must move, achieved bandwidth and its fraction of
#    the device's peak, for fused Adakaon / Lion (int8, 4-bit) against fused torch AdamW and the
#    bitsandbytes / torchao 8-bit and 4-bit AdamWs when installed (a few minutes).
# Everything lands in OUTDIR: pytest.txt, bench.txt, bench.json, env.txt. Paste bench.txt into
# benchmarks/RESULTS.md with the GPU name it prints.
#
# Environment: a Python with a CUDA torch and Triton (and optionally bitsandbytes, torchao); kaon
# is taken from src/ (no install needed). STEPS / WARMUP / SUITES / BENCH_TIMEOUT override the
# sizes below.
set -u
cd "$(dirname "$0")/.."
PHASE="${1:-all}"
case "$PHASE" in all|tests|bench) ;; *) echo "usage: $0 [all|tests|bench] [OUTDIR]"; exit 2;; esac
OUTDIR="${2:-${OUT:-benchmarks/gpu-out}}"
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# the validation run also exercises the automatic choice (fused=None picks the kernels)
export KAON_FUSED_AUTO=1
PY="${PYTHON:-python3}"
STEPS="${STEPS:-20}"
WARMUP="${WARMUP:-5}"
SUITES="${SUITES:-llm,sdxl,lora}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-420}"
TEST_TIMEOUT="${TEST_TIMEOUT:-300}"

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>&1 || true
  "$PY" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "memory clock kHz", getattr(p, "memory_clock_rate", None),
          "bus bits", getattr(p, "memory_bus_width", None))
for name in ("triton", "bitsandbytes", "torchao", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001
        print(name, "missing:", type(error).__name__, error)
PY
} > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

if [ "$PHASE" != bench ]; then
  echo "== tests/test_kernels.py on CUDA"
  timeout "$TEST_TIMEOUT" "$PY" -m pytest tests/test_kernels.py -q -p no:cacheprovider -rs \
    2>&1 | tee "$OUTDIR/pytest.txt" | tail -20
fi
if [ "$PHASE" != tests ]; then
  echo "== kaon bench --device cuda ($SUITES, $WARMUP + $STEPS steps)"
  timeout "$BENCH_TIMEOUT" "$PY" -m kaon bench --device cuda --dtype bfloat16 \
    --suite "$SUITES" --steps "$STEPS" --warmup "$WARMUP" --json "$OUTDIR/bench.json" 2>&1 \
    | tee "$OUTDIR/bench.txt"
fi
echo "results in $OUTDIR"
