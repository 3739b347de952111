#!/usr/bin/env bash
# SGLang engine on 2 GPUs, in one go (about 5-6 minutes):
#   1. packages/lightrft-engines/tests/test_sglang_gpu.py: one torchrun job, a tensor-parallel-2
#      engine then one engine per rank, each with generation, perturb-then-restore, release / resume
#      (>= 90 % freed, identical outputs), FSDP2 and ZeRO-3 training pushing into it;
#   2. benchmarks/sglang_sync_bench.py: weight sync of a ~1B Llama from FSDP2 and ZeRO-3 against the
#      bound and the per-parameter baseline, release / resume times and memory.
# Writes $OUT/sglang_gpu_tests.log, $OUT/sglang_sync.{json,log}; exits non-zero if a check failed.
#
# On the GPU machine, after the SGLang 0.5.16 bundle is installed in /tmp/ssite (see
# ../shared/device/bundle/README.md) and the workspace wheels are carried in .whl (scripts/gpu-prepare):
#   source scripts/gpu-env.sh && PYTHONPATH=/tmp/site:/tmp/ssite bash scripts/gpu-sglang.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
unset PYTORCH_CUDA_ALLOC_CONF  # the memory saver, not the caching allocator, must own the engine's memory
python3 -c "import sglang, lightrft.engines.sglang; print('sglang', sglang.__version__)" || exit 1
status=0

t0=$SECONDS
timeout 330 python3 -m pytest -q -p no:cacheprovider -rA packages/lightrft-engines/tests/test_sglang_gpu.py \
  > "$OUT/sglang_gpu_tests.log" 2>&1
rc=$?
echo "== GPU tests: rc=$rc in $((SECONDS - t0)) s"
tail -25 "$OUT/sglang_gpu_tests.log"
[ $rc -eq 0 ] || status=1

t0=$SECONDS
timeout 200 python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/sglang_sync_bench.py \
  --out "$OUT/sglang_sync.json" > "$OUT/sglang_sync.log" 2>&1
rc=$?
echo "== benchmark: rc=$rc in $((SECONDS - t0)) s"
grep -A60 '^metric' "$OUT/sglang_sync.log" || tail -40 "$OUT/sglang_sync.log"
[ $rc -eq 0 ] || status=1
exit $status
