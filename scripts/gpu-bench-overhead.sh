#!/usr/bin/env bash
# Strategy-overhead benchmarks (issue 8): the strategy code from BEFORE the redesign and AFTER it
# (this working tree), each against hand-written FSDP2 / DeepSpeed, on the same machine, one
# right after the other. Method: docs/benchmarks.md ("How the overhead is measured").
#
# 1. HERE, in the repository (needs git):
#      scripts/gpu-prepare                          # .whl/ (DeepSpeed + this workspace's wheels)
#      scripts/gpu-bench-overhead.sh prepare [REV]  # .before/ = `git archive REV` of packages/*/src
#    REV defaults to 8518df2 (main before the redesign). .before/ is git-ignored (.git/info/exclude).
# 2. ON THE GPU MACHINE (device `run`, kind nvidia-h100-x2, carry [".whl", ".before"]):
#      source scripts/gpu-env.sh && scripts/gpu-bench-overhead.sh run
#    Runs, in this order: fsdp before, fsdp after, deepspeed before, deepspeed after (4 torchrun
#    launches; models small + 1b; ZeRO-2 and ZeRO-3), then prints the before/after table.
#    Results: $OUT/{before,after}/{fsdp,deepspeed}_bench.{json,md}, $OUT/before_after.md, logs in
#    $OUT/logs/. About 8 minutes on 2 x H100 with the defaults below.
#
# Knobs (environment): NPROC (2), SECONDS_PER_CONFIG (18: timed seconds per model/stage), BLOCK (3
# steps per variant per round), MODELS (small,1b), STAGES (2,3), BENCHES ("fsdp deepspeed"),
# IMPLS ("before after"), VARIANTS (raw,strategy; add raw_norm to see what a host read of the
# norm costs), EXTRA_ARGS (passed to both scripts), BUDGET_S (540: a launch that would end past
# it gets fewer timed seconds per configuration, at least 6, so the device call's 600 s limit
# does not cut off the last launch).
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=${1:-}
case "$cmd" in
prepare)
  rev=${2:-8518df2}
  git rev-parse --verify -q "$rev^{commit}" >/dev/null || { echo "prepare: $rev is not a commit here" >&2; exit 2; }
  rm -rf .before && mkdir -p .before
  mapfile -t srcs < <(git ls-tree -d --name-only "$rev" packages/ | sed 's|$|/src|')
  git archive --format=tar "$rev" -- "${srcs[@]}" | tar -x -C .before
  git log -1 --format='%h %s' "$rev" > .before/REVISION
  { git log -1 --format='%h %s' HEAD; git status --short -- packages | sed 's/^/  /'; } > .before/AFTER
  echo "before = $(cat .before/REVISION)"
  echo "after  = this working tree: $(head -1 .before/AFTER) (+$(($(wc -l < .before/AFTER) - 1)) changed files under packages/)"
  find .before -name '*.py' | wc -l | xargs echo "python files exported:"
  ls .whl/lightrft/*.whl >/dev/null 2>&1 || echo "note: .whl/ has no workspace wheels yet: run scripts/gpu-prepare"
  ;;
run)
  [ -f .before/REVISION ] || { echo "run: .before/ is missing: run 'scripts/gpu-bench-overhead.sh prepare' here and carry .before" >&2; exit 2; }
  # ALLOW_CPU=1: a plumbing test on a machine without GPUs (tiny model over gloo; MODELS=tiny).
  [ "${ALLOW_CPU:-0}" = 1 ] || python3 -c "import torch, sys; sys.exit(0 if torch.cuda.device_count() >= ${NPROC:-2} else 1)" \
    || { echo "run: needs ${NPROC:-2} CUDA GPUs" >&2; exit 2; }
  [ "${NCCL_NVLS_ENABLE:-}" = 0 ] || echo "warning: NCCL_NVLS_ENABLE is not 0: source scripts/gpu-env.sh first" >&2
  out=${OUT:-$PWD/bench-out}
  mkdir -p "$out/logs"
  { echo "before: $(cat .before/REVISION)"; echo "after: working tree of"; cat .before/AFTER; nvidia-smi -L 2>/dev/null || true; } | tee "$out/revisions.txt"
  common=(--block "${BLOCK:-3}" --models "${MODELS:-small,1b}"
    --variants "${VARIANTS:-raw,strategy}")
  # shellcheck disable=SC2206
  extra=(${EXTRA_ARGS:-})
  status=0
  t_all=$SECONDS
  nimpl=$(echo ${IMPLS:-before after} | wc -w)
  launches_left=0; configs_left=0
  for bench in ${BENCHES:-fsdp deepspeed}; do
    n=$(echo "${MODELS:-small,1b}" | tr ',' '\n' | wc -l)
    [ "$bench" = deepspeed ] && n=$((n * $(echo "${STAGES:-2,3}" | tr ',' '\n' | wc -l)))
    launches_left=$((launches_left + nimpl)); configs_left=$((configs_left + n * nimpl))
  done
  for bench in ${BENCHES:-fsdp deepspeed}; do
    args=("${common[@]}")
    [ "$bench" = deepspeed ] && args+=(--stages "${STAGES:-2,3}")
    nmodels=$(echo "${MODELS:-small,1b}" | tr ',' '\n' | wc -l)
    nstages=1; [ "$bench" = deepspeed ] && nstages=$(echo "${STAGES:-2,3}" | tr ',' '\n' | wc -l)
    for impl in ${IMPLS:-before after}; do
      # Launches still to come (this one included) share what is left of BUDGET_S; each
      # configuration also costs ~15 s of setup and each launch ~25 s of start-up.
      left=$(( ${BUDGET_S:-540} - (SECONDS - t_all) ))
      ncfg=$((nmodels * nstages))
      secs=${SECONDS_PER_CONFIG:-18}
      fits=$(( (left - 25 * launches_left) / configs_left - 15 ))
      if [ "$fits" -lt "$secs" ]; then
        secs=$(( fits < 6 ? 6 : fits ))
        echo "note: $left s left of BUDGET_S for $launches_left launches: $secs timed s per configuration"
      fi
      launches_left=$((launches_left - 1)); configs_left=$((configs_left - ncfg))
      path=.before; [ "$impl" = after ] && path=.
      t0=$SECONDS
      echo "=== $bench / $impl ($path) ==="
      if torchrun --nproc-per-node="${NPROC:-2}" "benchmarks/${bench}_bench.py" --impl-path "$path" --label "$impl" \
        --out "$out/$impl" --seconds "$secs" "${args[@]}" "${extra[@]}" > "$out/logs/$bench-$impl.log" 2>&1; then
        sed -n '/^# /,$p' "$out/logs/$bench-$impl.log" | grep -v '^wrote ' || true
      else
        status=1
        echo "FAILED: $bench / $impl; last lines of $out/logs/$bench-$impl.log:"
        tail -25 "$out/logs/$bench-$impl.log"
      fi
      echo "--- $bench / $impl: $((SECONDS - t0)) s"
    done
  done
  echo "=== before / after (strategy / raw; $((SECONDS - t_all)) s in all) ==="
  python3 benchmarks/_stats.py "$out" | tee "$out/before_after.md"
  exit $status
  ;;
*)
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
  ;;
esac
