#!/usr/bin/env bash
# One device command (one H200, under ~9 minutes): the MoE CUDA tests, then the MoE decode
# benchmark with kiln::moe_experts' Triton path, profiled, beside the grouped-matmul-only path,
# kiln::moe_experts alone, and transformers.
#
#     bash benchmarks/moe_device_run.sh            # everything, results under $OUT
#     PARTS="tests kiln" bash benchmarks/moe_device_run.sh
#
# PARTS (default "tests kiln op grouped hf"), in this order, each under its own `timeout` and all
# under one deadline (DEADLINE_S, default 540 s from the start):
#   tests    pytest tests/cuda/test_moe_triton.py tests/cuda/test_moe_cuda.py
#   kiln     moe_decode.py --part kiln, batches 1,8,64, --profile (kernel tables at 1 and 8), floor
#   op       moe_decode.py --part op: kiln::moe_experts alone, Triton vs grouped, block sizes
#   grouped  moe_decode.py --part kiln --triton-max-rows 0 --tag grouped (the A/B: the same model
#            on the grouped matmuls alone; warm compile cache from `kiln`), profiled
#   hf       moe_decode.py --part transformers: eager at 1,8,64, then static-cache generate with
#            the time that is left (skipped batches say why in the JSON)
#   hfstatic static-cache generate alone at 8,64 with all the time left (a second command, where
#            `hf` ran out of time: it compiles once per batch size), moe_transformers_static.json
# Output ($OUT, default ./moe-device-out): log.txt (everything printed), summary.txt (the
# combined table), results.tar.gz (moe_*.json and profile_*.txt: benchmarks/results/moe_decode_h200/).
#
# Python: the device's python3 (torch, Triton, transformers, pytest); kiln's config needs pydantic,
# which that image lacks: carry cp312 wheels in .whl/ (carry: [".whl"]), made here with
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated_types typing_inspection
# or .device/'s bundle (benchmarks/device_setup.sh) where the checkout has one.
set -u
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-540}
PARTS=${PARTS:-"tests kiln op grouped hf"}
OUT=${OUT:-$PWD/moe-device-out}
RES="$OUT/moe_decode_h200"
mkdir -p "$RES"
LOG="$OUT/log.txt"

if [ -f .device/pybundle-cp312.tar.xz ]; then
  . benchmarks/device_setup.sh
else
  SITE="${TMPDIR:-/tmp}/kiln-site"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  fi
  export PYTHONPATH="$PWD:$SITE:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
fi
PY=${PY:-python3}
$PY -c 'import pydantic' 2>/dev/null || echo "WARNING: no pydantic for $PY: kiln's parts will fail (see the header: .whl/)" | tee -a "$LOG"

left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
step() {  # step NAME MAX_SECONDS COMMAND...: runs with the smaller of MAX_SECONDS and what is left
  local name=$1 max=$2; shift 2
  local limit; limit=$(left)
  [ "$limit" -gt "$max" ] && limit=$max
  if [ "$limit" -lt 20 ]; then echo "=== $name: skipped, ${limit}s left of ${DEADLINE_S}s" | tee -a "$LOG"; return; fi
  echo "=== $name (limit ${limit}s, $(( $(date +%s) - START ))s in)" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name: rc ${PIPESTATUS[0]}" | tee -a "$LOG"
}
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
} 2>&1 | tee -a "$LOG"

CACHE="${TMPDIR:-/tmp}/kiln-moe-cache"
BENCH="$PY benchmarks/moe_decode.py --out $RES --steps 50"
has tests && step tests 150 $PY -m pytest tests/cuda/test_moe_triton.py tests/cuda/test_moe_cuda.py -q -p no:cacheprovider -rs
has kiln && step kiln 240 $BENCH --part kiln --batches 1,8,64 --profile --cache-dir "$CACHE"
has op && step op 120 $BENCH --part op
has grouped && step grouped 150 $BENCH --part kiln --batches 1,8,64 --profile --no-floor --triton-max-rows 0 --tag grouped --cache-dir "$CACHE"
if has hf; then
  budget=$(( $(left) - 90 ))  # the model's build and the last measurement's own time after the budget
  [ "$budget" -lt 30 ] && budget=30
  step hf 600 $BENCH --part transformers --batches 1,8,64 --hf-variants eager,static --hf-budget-s "$budget"
fi
if has hfstatic; then
  budget=$(( $(left) - 120 ))
  [ "$budget" -lt 30 ] && budget=30
  step hfstatic 600 $BENCH --part transformers --batches 8,64 --hf-variants static --tag static --hf-budget-s "$budget"
fi
$PY benchmarks/moe_decode.py --combine "$RES" 2>&1 | tee "$OUT/summary.txt"
tar -czf "$OUT/results.tar.gz" -C "$OUT" moe_decode_h200 && rm -rf "$RES"
echo "=== done in $(( $(date +%s) - START ))s" | tee -a "$LOG"
