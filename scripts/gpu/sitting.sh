#!/usr/bin/env bash
# One GPU sitting on one H200 (device `run`, kind nvidia-h200), as calls back to back (the machine
# goes back 30 s after a call, and /tmp with it). The bundles (../shared/device/bundle/README.md)
# travel one 56 MiB part per call; meanwhile the 1-GPU strategy tests run in the background.
#
#   call 1   carry [.whl] and any small part (.whl with a 48 MiB part is over a call's 64 MiB):
#            bash scripts/gpu/sitting.sh start   (bundle folders may be named vllm48, sglang48, ...)
#   calls    carry [.bundle/sglang/partNN] (or vllm):                   bash scripts/gpu/sitting.sh stash sglang/partNN
#   then     bash scripts/gpu/sitting.sh launch sglang SECONDS scripts/gpu/plan-sglang.txt
#            (installs that bundle, runs the plans in the background after any launch before it,
#            from its own copy of this tree; steps stop at now + SECONDS)
#            ... more stash calls, another launch ...
#            bash scripts/gpu/sitting.sh poll 540  # waits (at most N s) and returns $OUT/results.tgz
# A plan line is: NAME BUDGET_S SITE COMMAND...; COMMAND runs from that copy of the tree with
# $STEP_OUT (its result folder) and $STEP_BUDGET (seconds) set, under `timeout`. A step is skipped
# when less than 60% of its budget is left before the launch's deadline; it gets what is left.
# `+NAME` runs a step in the background beside the next ones, until a line `wait`.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/results
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions HF_HUB_OFFLINE=1
unset PYTORCH_CUDA_ALLOC_CONF  # expandable segments stop vLLM's sleep mode from freeing memory

install_workspace() {
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site /tmp/whl/*.whl /tmp/whl/lightrft/*.whl || return 1
  python3 -c "import rich, matplotlib" 2>/dev/null || [ -d /tmp/dsite ] || python3 -m pip install -q \
    --no-index --no-deps --no-compile --no-cache-dir --target /tmp/dsite /tmp/whl/demo/*.whl
  # TRL 1.16 and datasets, for benchmarks/trl_grpo_compare.py only (PYTHONPATH=...:/tmp/tsite there)
  [ -d /tmp/tsite ] || ! ls /tmp/whl/trl/*.whl >/dev/null 2>&1 || python3 -m pip install -q \
    --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tsite /tmp/whl/trl/*.whl
}

collect() {  # everything small under /tmp/results into $OUT/results.tgz (16 MiB a file at most)
  (cd /tmp && find results -type f -size -6M ! -name '*.safetensors' ! -name '*.pt' ! -name '*.bin' \
     ! -path '*/ckpt*' ! -path '*/model/*' -print0 | tar czf "$OUT/results.tgz" --null -T -)
  ls -la "$OUT"; cat /tmp/results/chain.log 2>/dev/null
}

run_step() {  # run_step NAME BUDGET SITE CMD: one step under timeout, its log and rc in /tmp/results
  local name=$1 budget=$2 site=$3 cmd=$4 t0 rc
  mkdir -p "/tmp/results/$name"; t0=$(date +%s)
  echo "$(date +%T) START $name budget=$budget site=$site ($(nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null))" >> /tmp/results/chain.log
  ( cd "$REPO" && export STEP_OUT=/tmp/results/$name STEP_BUDGET=$budget \
      PYTHONPATH=/tmp/site:/tmp/$site:/tmp/dsite VLLM_ENABLE_V1_MULTIPROCESSING=0 \
    && timeout -k 20 "$budget" bash -c "$cmd" ) > "/tmp/results/$name/log.txt" 2>&1 < /dev/null
  rc=$?
  echo "$(date +%T) END $name rc=$rc in $(( $(date +%s) - t0 )) s" >> /tmp/results/chain.log
}

run_plan() {  # run_plan PLANFILE DEADLINE_EPOCH
  # A NAME starting with + runs in the background beside the next steps; a line `wait` waits for
  # them (and so does the plan's end). Steps side by side share the GPU: each must ask for a
  # small share of its memory, and their timings are not figures.
  local plan=$1 deadline=$2 name budget site cmd left
  while read -r name budget site cmd; do
    case "$name" in ''|'#'*) continue ;; wait) wait; continue ;; esac
    left=$((deadline - $(date +%s)))
    if [ "$left" -lt $((budget * 6 / 10)) ]; then echo "$(date +%T) SKIP ${name#+} (needs $budget s, $left left)" >> /tmp/results/chain.log; continue; fi
    [ "$left" -lt "$budget" ] && budget=$left
    case "$name" in
      +*) run_step "${name#+}" "$budget" "$site" "$cmd" & ;;
      *) run_step "$name" "$budget" "$site" "$cmd" ;;
    esac
  done < "$plan"
  wait
  pkill -9 -f 'sglang::' 2>/dev/null; pkill -9 -f 'sglang.srt' 2>/dev/null  # an SGLang scheduler left behind
  true
}

case "${1:-}" in
start)
  nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  mkdir -p /tmp/vb /tmp/sb || exit 1
  shopt -s nullglob  # a call 1 may carry no part (then the stash calls bring them all)
  for p in .bundle/*/part*; do  # the parts this call carried (any bundle folder: vllm, vllm48, ...)
    case "$p" in .bundle/sglang*) cp -r "$p" /tmp/sb/ ;; *) cp -r "$p" /tmp/vb/ ;; esac || exit 1
  done
  rm -rf /tmp/whl && cp -r .whl /tmp/whl && install_workspace || exit 1
  rm -rf /tmp/repo0 && mkdir -p /tmp/repo0 && cp -r pyproject.toml benchmarks scripts packages examples /tmp/repo0/ || exit 1
  mkdir -p /tmp/results/gpu_tests
  setsid nohup bash -c "cd /tmp/repo0 && export PYTHONPATH=/tmp/site:/tmp/dsite && timeout 150 python3 -m pytest -q -p no:cacheprovider \
      -m gpu packages/lightrft-fsdp/tests packages/lightrft-deepspeed/tests -rs; echo rc=\$? > /tmp/results/gpu_tests/rc" > /tmp/results/gpu_tests/log.txt 2>&1 < /dev/null &
  sleep 2; echo started
  ;;
stash)
  part=$2; dest=/tmp/vb; case "$part" in sglang*) dest=/tmp/sb ;; esac
  mkdir -p "$dest" && cp -r ".bundle/$part" "$dest/" && echo "stashed $part: $(ls /tmp/vb | wc -l) vllm, $(ls /tmp/sb | wc -l) sglang"
  tail -2 /tmp/results/gpu_tests/log.txt 2>/dev/null; true
  ;;
launch)  # launch vllm|sglang SECONDS PLAN...
  engine=$2; budget=$3; shift 3
  install_workspace || exit 1
  t0=$SECONDS
  case "$engine" in
    vllm) [ -d /tmp/vsite ] || BUNDLE=/tmp/vb SITE=/tmp/vsite bash /tmp/vb/part01/assemble.sh > /tmp/results/vllm_install.log 2>&1 \
            || { tail -20 /tmp/results/vllm_install.log; exit 1; } ;;
    sglang) [ -d /tmp/ssite ] || BUNDLE=/tmp/sb SITE=/tmp/ssite bash /tmp/sb/part01/assemble.sh > /tmp/results/sglang_install.log 2>&1 \
            || { tail -20 /tmp/results/sglang_install.log; exit 1; } ;;
    *) echo "launch: engine $engine is invalid: valid are vllm, sglang"; exit 2 ;;
  esac
  echo "$engine bundle ready in $((SECONDS - t0)) s"
  repo=/tmp/repo-$engine-$(date +%s)
  mkdir -p "$repo" && cp -r pyproject.toml benchmarks scripts packages examples "$repo/" || exit 1
  deadline=$(( $(date +%s) + budget ))
  touch /tmp/master.$$.queued
  setsid nohup bash -c "for i in \$(seq 90); do [ -f /tmp/results/gpu_tests/rc ] && break; sleep 2; done; \
    while ls /tmp/master.*.running >/dev/null 2>&1; do sleep 2; done; \
    mv /tmp/master.$$.queued /tmp/master.$$.running; export REPO=$repo; \
    for plan in $*; do bash $repo/scripts/gpu/sitting.sh _plan $repo/\$plan $deadline; done; rm -f /tmp/master.$$.running" \
    > "/tmp/results/master-$engine.log" 2>&1 < /dev/null &
  sleep 3; cat /tmp/results/gpu_tests/rc 2>/dev/null; tail -3 /tmp/results/gpu_tests/log.txt; cat /tmp/results/chain.log 2>/dev/null
  ;;
_plan) run_plan "$2" "$3" ;;
poll)
  limit=${2:-540}; t0=$SECONDS
  busy() { compgen -G "/tmp/master.*.running" >/dev/null || compgen -G "/tmp/master.*.queued" >/dev/null; }
  while busy && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 5; done
  busy && echo "still running" || echo "all plans done"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
  collect
  ;;
stop) pkill -f 'sitting.sh _plan'; pkill -9 -f python3; rm -f /tmp/master.*; collect ;;
*) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
