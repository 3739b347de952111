#!/usr/bin/env bash
# One GPU session on 2 x H100 (device `run`, kind nvidia-h100-x2), as short calls back to back.
# The vLLM and SGLang bundles (../shared/device/bundle/README.md, re-cut to 56 MiB parts so that a
# part plus this tree fits the 64 MiB carry) travel one part per call; while they do, the
# strategy-overhead benchmark (issue 8) runs in the background on the otherwise idle GPUs.
#
#   call 1   carry [.whl, .before, .bundle/vllm56/part08, .bundle/sglang56/part09]:
#              bash scripts/gpu-session.sh start
#   calls    carry [.bundle/vllm56/partNN] or [.bundle/sglang56/partNN]:
#              bash scripts/gpu-session.sh stash vllm56/partNN   (or sglang56/partNN)
#   then     bash scripts/gpu-session.sh vllm     (waits for the benchmark, installs vLLM, runs
#                                                  scripts/gpu-vllm.sh and the demo with vllm)
#            bash scripts/gpu-session.sh sglang-probe (installs SGLang, runs scripts/gpu-sglang-probe.py:
#                                                  which start-up configuration works; <= 540 s)
#            bash scripts/gpu-session.sh sglang-tests (scripts/gpu-sglang.sh tests; <= 450 s)
#            bash scripts/gpu-session.sh sglang-bench (scripts/gpu-sglang.sh bench; <= 300 s)
#            bash scripts/gpu-session.sh demo-sglang
# Everything stays in /tmp while the machine is warm (30 s after a call): no gaps between calls.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions

install_workspace() {  # the carried wheels (copied to /tmp/whl by `start`) into /tmp/site
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site /tmp/whl/*.whl /tmp/whl/lightrft/*.whl || return 1
  python3 -c "import rich, matplotlib" 2>/dev/null || [ -d /tmp/dsite ] || python3 -m pip install -q \
    --no-index --no-deps --no-compile --no-cache-dir --target /tmp/dsite /tmp/whl/demo/*.whl
}

bench_wait() {  # waits for the background benchmark (at most $1 s), then copies its results
  local limit=${1:-60} t0=$SECONDS
  while [ -f /tmp/bench.running ] && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 5; done
  if [ -f /tmp/bench.running ]; then
    echo "benchmark still running after ${limit}s: stopping it"; pkill -f gpu-bench-overhead.sh; pkill -f _bench.py; sleep 5
  fi
  mkdir -p "$OUT/bench"
  cp /tmp/bench-out/*.md /tmp/bench-out/revisions.txt "$OUT/bench/" 2>/dev/null
  cp /tmp/bench-out/after/*.json /tmp/bench-out/after/*.md "$OUT/bench/" 2>/dev/null
  cp /tmp/bench.log "$OUT/bench/" 2>/dev/null
  tail -30 /tmp/bench.log
}

case "${1:-}" in
start)
  nvidia-smi -L
  mkdir -p /tmp/vb /tmp/sb
  cp -r .bundle/vllm56/part08 /tmp/vb/ && cp -r .bundle/sglang56/part09 /tmp/sb/ || exit 1
  rm -rf /tmp/whl /tmp/repo && cp -r .whl /tmp/whl || exit 1
  install_workspace || exit 1
  # The benchmark runs from a copy of this tree: the next call replaces the tree here.
  mkdir -p /tmp/repo && cp -r benchmarks scripts packages .before /tmp/repo/ || exit 1
  touch /tmp/bench.running
  setsid nohup bash -c "cd /tmp/repo && export PYTHONPATH=/tmp/site && OUT=/tmp/bench-out \
    BENCHES='${BENCHES:-fsdp deepspeed}' IMPLS='${IMPLS:-after}' SECONDS_PER_CONFIG=${SECONDS_PER_CONFIG:-30} \
    BUDGET_S=${BUDGET_S:-330} EXTRA_ARGS='${EXTRA_ARGS:---micro-batch small=40,1b=20}' \
    bash scripts/gpu-bench-overhead.sh run; rm -f /tmp/bench.running" > /tmp/bench.log 2>&1 < /dev/null &
  sleep 3; echo "benchmark started in the background"; head -5 /tmp/bench.log
  ;;
stash)  # stash vllm56/partNN | sglang56/partNN
  part=$2; dest=/tmp/vb; case "$part" in sglang*) dest=/tmp/sb ;; esac
  mkdir -p "$dest" && cp -r ".bundle/$part" "$dest/" && echo "stashed $part: $(ls /tmp/vb /tmp/sb | tr '\n' ' ')"
  [ -f /tmp/bench.running ] && { echo "benchmark: running"; grep -E '^(===|---|note|\| )' /tmp/bench.log | tail -4; }
  true
  ;;
vllm)
  bench_wait "${BENCH_WAIT_S:-120}"
  install_workspace || exit 1
  [ -d /tmp/vsite ] || BUNDLE=/tmp/vb SITE=/tmp/vsite bash /tmp/vb/part01/assemble.sh > "$OUT/vllm_install.log" 2>&1 \
    || { tail -20 "$OUT/vllm_install.log"; exit 1; }
  export PYTHONPATH=/tmp/site:/tmp/vsite:/tmp/dsite
  OUT=$OUT bash scripts/gpu-vllm.sh
  ;;
sglang-probe|sglang-tests|sglang-bench)
  install_workspace || exit 1
  [ -d /tmp/ssite ] || BUNDLE=/tmp/sb SITE=/tmp/ssite bash /tmp/sb/part01/assemble.sh > "$OUT/sglang_install.log" 2>&1 \
    || { tail -20 "$OUT/sglang_install.log"; exit 1; }
  export PYTHONPATH=/tmp/site:/tmp/ssite:/tmp/dsite
  unset PYTORCH_CUDA_ALLOC_CONF
  case "$1" in
  sglang-probe) python3 scripts/gpu-sglang-probe.py --out "$OUT/probe" --budget "${PROBE_BUDGET_S:-520}" \
                  ${PROBE_ONLY:+--only "$PROBE_ONLY"} ;;
  sglang-tests) OUT=$OUT bash scripts/gpu-sglang.sh tests ;;
  sglang-bench) OUT=$OUT bash scripts/gpu-sglang.sh bench ;;
  esac
  ;;
demo-sglang)
  export PYTHONPATH=/tmp/site:/tmp/ssite:/tmp/dsite
  unset PYTORCH_CUDA_ALLOC_CONF
  timeout "${DEMO_TIMEOUT:-300}" python3 -m lightrft_demo --strategy fsdp --engine sglang --nproc 2 --bf16 \
    --engine_tp_size 1 --enable_engine_sleep --engine_mem_util 0.2 --hidden-size 512 --num-layers 2 \
    --iterations "${DEMO_ITERS:-20}" --output-dir /tmp/demo-sglang --overwrite > "$OUT/demo_sglang.log" 2>&1
  rc=$?; tail -30 "$OUT/demo_sglang.log"; cp /tmp/demo-sglang/metrics.jsonl "$OUT/demo_sglang_metrics.jsonl" 2>/dev/null
  cp /tmp/demo-sglang/reward_curve.png "$OUT/demo_sglang_reward.png" 2>/dev/null; exit $rc
  ;;
*)
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2
  ;;
esac
