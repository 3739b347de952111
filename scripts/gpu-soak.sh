#!/usr/bin/env bash
# Issue 17 on one H200, one part per device call (each under the 600 s limit; the soak parts stop
# themselves cleanly before --budget-s and still write their summary):
#   soak-fsdp-vllm     benchmarks/rl_soak.py, FSDP2 + vLLM, 3.5B, ITERS=300      (~7-9 min)
#   soak-fsdp-sglang   benchmarks/rl_soak.py, FSDP2 + SGLang, 3.5B, ITERS=300    (~8-9.5 min)
#   soak-zero3-vllm    benchmarks/rl_soak.py, ZeRO-3 + vLLM, 1.5B, ITERS=100     (~3-4 min)
#   soak-zero3-sglang  benchmarks/rl_soak.py, ZeRO-3 + SGLang, 1.5B, ITERS=100   (~4-5 min)
#   sync-vllm          benchmarks/engine_sync_bench.py --engine vllm, FSDP2, MODEL=3.5b   (~2-3 min)
#   sync-sglang        benchmarks/engine_sync_bench.py --engine sglang, FSDP2, MODEL=3.5b (~3-4 min)
# Each writes $OUT/<part>/ (iterations.jsonl, summary.json, soak.png, log.txt; or sync_*.json/.log)
# and exits non-zero when a check failed. The environment first (the wheels and one engine bundle):
#   source scripts/gpu-env.sh && PYTHONPATH=$PYTHONPATH:/tmp/vsite bash scripts/gpu-soak.sh soak-fsdp-vllm
#   source scripts/gpu-env.sh && PYTHONPATH=$PYTHONPATH:/tmp/ssite bash scripts/gpu-soak.sh soak-fsdp-sglang
# matplotlib missing there: the plot is skipped with a note; redraw it here from the JSONL with
#   uv run python benchmarks/rl_soak.py --plot <the fetched part dir>
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
part=${1:-}
dir=$OUT/$part
mkdir -p "$dir/sglang-logs"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export LIGHTRFT_SGLANG_LOG_DIR=$dir/sglang-logs OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
unset PYTORCH_CUDA_ALLOC_CONF  # expandable segments defeat both engines' sleep
LIMIT=${LIMIT:-590}            # the device call's 600 s, less the copy back

soak() {  # strategy engine model iterations
  timeout "$LIMIT" python3 benchmarks/rl_soak.py --strategy "$1" --engine "$2" --model "$3" \
    --iterations "${ITERS:-$4}" --sleep-level 2 --out "$dir" --budget-s $((LIMIT - 25)) ${EXTRA:-}
}
sync_bench() {  # engine
  timeout "$LIMIT" python3 benchmarks/engine_sync_bench.py --engine "$1" --strategy fsdp \
    --model "${MODEL:-3.5b}" --out "$dir" --budget-s $((LIMIT - 120)) ${EXTRA:-}
}

t0=$SECONDS
case "$part" in
soak-fsdp-vllm) soak fsdp vllm 3.5b 300 ;;
soak-fsdp-sglang) soak fsdp sglang 3.5b 300 ;;
soak-zero3-vllm) soak deepspeed vllm 1.5b 100 ;;
soak-zero3-sglang) soak deepspeed sglang 1.5b 100 ;;
sync-vllm) sync_bench vllm ;;
sync-sglang) sync_bench sglang ;;
*) echo "usage: bash scripts/gpu-soak.sh soak-fsdp-vllm|soak-fsdp-sglang|soak-zero3-vllm|soak-zero3-sglang|sync-vllm|sync-sglang"; exit 2 ;;
esac
rc=$?
echo "== $part: rc=$rc in $((SECONDS - t0)) s (results in $dir)"
exit $rc
