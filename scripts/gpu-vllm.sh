#!/usr/bin/env bash
# vLLM engine on 2 GPUs, in one go (about 5 minutes): weight-sync benchmark + checks (sleep frees
# >= 90 % of the engine's memory, identical outputs after wake) from FSDP2 training with a
# tensor-parallel-2 engine (external_launcher, one engine over both GPUs) and from ZeRO-3 training
# with one TP-1 engine per GPU. Writes $OUT/engine_sync_{fsdp_tp2,deepspeed_tp1}.json and .log;
# exits non-zero if a check failed.
#
# On the GPU machine, after the vLLM 0.26.0 bundle is installed in /tmp/vsite (see
# ../shared/device/bundle/README.md) and the workspace wheels are carried in .whl (scripts/gpu-prepare):
#   source scripts/gpu-env.sh && PYTHONPATH=/tmp/site:/tmp/vsite bash scripts/gpu-vllm.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
unset PYTORCH_CUDA_ALLOC_CONF  # expandable segments stop sleep mode from freeing memory
python3 -c "import vllm, lightrft.engines.vllm_engine; print('vllm', vllm.__version__)" || exit 1
status=0
run() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" torchrun --standalone --nproc-per-node 2 benchmarks/engine_sync_bench.py --engine vllm \
    --out "$OUT/engine_sync_$name.json" "$@" > "$OUT/engine_sync_$name.stdout" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"; grep -B1 -A40 '^operation' "$OUT/engine_sync_$name.stdout" || tail -40 "$OUT/engine_sync_$name.stdout"
  [ $rc -eq 0 ] || status=1
}
run fsdp_tp2 175 --strategy fsdp --engine_tp_size 2
run deepspeed_tp1 150 --strategy deepspeed --engine_tp_size 1

# The demo (issue 12) with the vllm engine: FSDP2 on both GPUs, one TP-1 engine per rank, sleeping
# while the policy trains; reward, tokens/s and weight-sync time per iteration in metrics.jsonl.
t0=$SECONDS
timeout "${DEMO_TIMEOUT:-200}" python3 -m lightrft_demo --strategy fsdp --engine vllm --nproc 2 --bf16 \
  --engine_tp_size 1 --enable_engine_sleep --engine_mem_util 0.2 --engine_enforce_eager --hidden-size 256 \
  --num-layers 2 --iterations "${DEMO_ITERS:-20}" --output-dir /tmp/demo-vllm --overwrite > "$OUT/demo_vllm.log" 2>&1
rc=$?
echo "== demo --engine vllm: rc=$rc in $((SECONDS - t0)) s"; tail -25 "$OUT/demo_vllm.log"
cp /tmp/demo-vllm/metrics.jsonl "$OUT/demo_vllm_metrics.jsonl" 2>/dev/null
cp /tmp/demo-vllm/reward_curve.png "$OUT/demo_vllm_reward.png" 2>/dev/null
[ $rc -eq 0 ] || status=1
exit $status
