#!/usr/bin/env bash
# One GPU measurement run of issue #15's checks, sized for a few minutes on one H100/H200:
#   1. cuDNN attention parity with the einsum path (tests/test_attention.py, the cudnn cases)
#      and the unrolled decode against the scanned one;
#   2. launch.benchmark's GPU mode, one process per mode: sft, generate, attention, ppo, with
#      jax.profiler traces of the SFT steps and a PPO iteration under $RESULTS/profile.
# Each step gets what is left of BUDGET seconds (default 540); a step that runs out is
# killed and the next one starts. Results: $RESULTS/<mode>.json, <mode>.md and <step>.log,
# and all of them in $ARCHIVE (a .tgz) when that is set.
#
#   RESULTS=/tmp/gpu BUDGET=540 ARCHIVE=/tmp/gpu.tgz bash launch/jobs/gpu_check.sh
set -u
RESULTS=${RESULTS:-/tmp/cai_jax_gpu}
ARCHIVE=${ARCHIVE:-}
BUDGET=${BUDGET:-540}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }

step() {  # step NAME MIN_SECONDS COMMAND...: runs COMMAND if MIN_SECONDS are left
  local name=$1 need=$2
  shift 2
  local t=$(left)
  if (( t < need )); then
    echo "== $name: skipped, ${t}s left"
    return
  fi
  echo "== $name (${t}s left)"
  timeout "$t" "$@" >"$RESULTS/$name.log" 2>&1
  echo "== $name: exit $? after $(( BUDGET - $(left) ))s in all"
  tail -n 25 "$RESULTS/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

step tests 60 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider \
  tests/test_attention.py tests/test_sampling.py -k "cudnn or prefill_cache or unrolled"
for mode in sft generate attention ppo; do
  reps=3 extra=()
  [[ $mode == generate ]] && reps=2   # each 7B decode call is seconds long
  # jax.profiler traces of one SFT step and one PPO iteration (a decode trace is too large)
  [[ $mode == sft || $mode == ppo ]] && extra=(--profile_dir="$RESULTS/profile")
  step "$mode" 40 python3 -m launch.benchmark --device=gpu --what="$mode" --reps=$reps \
    --out="$RESULTS/$mode.json" ${extra[@]+"${extra[@]}"}
  [[ -f "$RESULTS/$mode.log" ]] && sed -n '/^cai_jax vs references/,$p' "$RESULTS/$mode.log" \
    >"$RESULTS/$mode.md"
done
echo "== done in $(( BUDGET - $(left) ))s"
[[ -n "$ARCHIVE" ]] && tar czf "$ARCHIVE" -C "$RESULTS" .
cat "$RESULTS"/*.md 2>/dev/null
