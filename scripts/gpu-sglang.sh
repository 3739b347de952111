#!/usr/bin/env bash
# SGLang engine on 2 GPUs; one part per device call (each well under 600 s):
#   tests  packages/lightrft-engines/tests/test_sglang_gpu.py: one torchrun job, a tensor-parallel-2
#          engine then one engine per rank, each with generation, perturb-then-restore, release / resume
#          (>= 90 % freed, identical outputs), FSDP2 and ZeRO-3 training pushing into it (<= 450 s);
#   bench  benchmarks/engine_sync_bench.py --engine sglang: weight sync of a 0.8B Llama from FSDP2 against
#          its floor and the per-parameter paths, release / resume times and memory (<= 300 s).
# First find a configuration that starts at all with scripts/gpu-sglang-probe.py (gpu-session.sh
# sglang-probe): it also compiles SGLang's JIT kernels (~/.cache/tvm-ffi) for the test model's shape.
# Writes $OUT/sglang_gpu_tests.log, $OUT/sglang_sync.{json,log,stdout} and SGLang's own logs (every process,
# info; a failed start adds the schedulers' Python stacks, *.stacks) in $OUT/sglang-logs; exits
# non-zero if a check failed.
#
# On the GPU machine, after the SGLang 0.5.16 bundle is installed in /tmp/ssite (see
# ../shared/device/bundle/README.md) and the workspace wheels are carried in .whl (scripts/gpu-prepare):
#   source scripts/gpu-env.sh && PYTHONPATH=/tmp/site:/tmp/ssite bash scripts/gpu-sglang.sh tests|bench
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" "$OUT/sglang-logs"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
unset PYTORCH_CUDA_ALLOC_CONF  # the memory saver, not the caching allocator, must own the engine's memory
export LIGHTRFT_SGLANG_LOG_DIR=$OUT/sglang-logs LIGHTRFT_SGLANG_LOG_LEVEL=${LIGHTRFT_SGLANG_LOG_LEVEL:-info}
python3 -c "import sglang, lightrft.engines.sglang; print('sglang', sglang.__version__)" || exit 1
status=0

case "${1:-}" in
tests)
  t0=$SECONDS
  LIGHTRFT_SGLANG_START_TIMEOUT=${LIGHTRFT_SGLANG_START_TIMEOUT:-200} LIGHTRFT_SGLANG_TEST_TIMEOUT=420 \
    timeout 450 python3 -m pytest -q -p no:cacheprovider -rA packages/lightrft-engines/tests/test_sglang_gpu.py \
    > "$OUT/sglang_gpu_tests.log" 2>&1
  rc=$?
  echo "== GPU tests: rc=$rc in $((SECONDS - t0)) s"
  grep -E "Capture cuda graph|Load weight end|KV Cache is allocated|not ready after|scheduler died" \
    "$OUT/sglang_gpu_tests.log" | tail -12
  tail -40 "$OUT/sglang_gpu_tests.log"
  [ $rc -eq 0 ] || status=1
  ;;
bench)
  t0=$SECONDS
  LIGHTRFT_SGLANG_START_TIMEOUT=${LIGHTRFT_SGLANG_START_TIMEOUT:-150} \
    timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/engine_sync_bench.py \
    --engine sglang --strategy fsdp --out "$OUT/sglang_sync.json" > "$OUT/sglang_sync.stdout" 2>&1
  rc=$?
  echo "== benchmark: rc=$rc in $((SECONDS - t0)) s"
  grep -B1 -A60 '^operation' "$OUT/sglang_sync.stdout" || tail -60 "$OUT/sglang_sync.stdout"
  [ $rc -eq 0 ] || status=1
  ;;
*)
  echo "usage: bash scripts/gpu-sglang.sh tests|bench"; exit 2
  ;;
esac
ls -la "$OUT/sglang-logs" | tail -8
exit $status
