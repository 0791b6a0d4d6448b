#!/usr/bin/env bash
# The whole GPU check of deqkit in one command (target: under 5 minutes on one GPU).
#
#   scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_check_out
#
# 1. the tests that have a CUDA path, on CUDA (DEQKIT_TEST_DEVICE=cuda): AMP (bf16; fp16 with a
#    GradScaler), the compiled cell (inductor), and the rest of the suite's device-aware tests;
# 2. the benchmark rows on CUDA: mixed precision, compiled cell, DDP scaling (NCCL; 1 process,
#    and 2 when two GPUs are visible);
# 3. a 1-epoch training run with --device cuda --amp bf16 --compile (fp16 + GradScaler, overflow
#    included, is in the tests of step 1);
# 4. the benchmark suite's step-cost section on CUDA (python -m deqkit.bench --quick --device cuda).
# Every step's output goes to OUT_DIR/<step>.txt; a summary line per step is printed at the end.
# Each step has its own time limit (80+30+90+40+60+40 s: 340 s at worst; the steps usually end well
# inside their limits), so one hung step cannot take the whole budget. The tests compile with aot_eager; inductor runs in bench-compile and train-cuda.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DEQKIT_TEST_DEVICE=cuda
declare -a SUMMARY=()

step() {  # step NAME LIMIT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -n 15 "$OUT/$name.txt"
  SUMMARY+=("$name: rc=$rc ${dt}s")
}

"$PY" - <<'PY' > "$OUT/env.txt" 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
print("bf16 supported", torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "nccl", torch.distributed.is_nccl_available())
PY
cat "$OUT/env.txt"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")

step tests-cuda 80 "$PY" -m pytest -q -x tests/test_amp.py tests/test_compile.py -rA
step bench-amp 30 "$PY" -m deqkit.apps.bench.scale amp --device cuda --steps 10 --warmup 2
step bench-compile 90 "$PY" -m deqkit.apps.bench.scale compile --device cuda --backend inductor --steps 10 --warmup 2
if [ "$NGPU" -ge 2 ]; then NPROC="1,2"; else NPROC="1"; fi
step bench-scaling 40 "$PY" -m deqkit.apps.bench.scale scaling --device cuda --nproc "$NPROC" --steps 10 --warmup 2
step train-cuda 60 "$PY" -m deqkit train --device cuda --amp bf16 --compile --epochs 1 --subset 512 --out "$OUT/train" --no-progress
step bench-suite 40 "$PY" -m deqkit.bench --quick --repeats 1 --device cuda --section step

echo
echo "== summary (outputs in $OUT/)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
! grep -q "rc=[1-9]" "$OUT/summary.txt"
