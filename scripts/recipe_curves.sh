#!/usr/bin/env bash
# Run each cookbook recipe on the bundled model with the settings its page in docs/recipes/
# quotes, then print the curves of the metrics that matter (tinsmith.cookbook.curves).
#   bash scripts/recipe_curves.sh                 # every recipe, one after another
#   bash scripts/recipe_curves.sh dpo rlhf        # just these
# Each run starts fresh in runs/curves/<name> (an embedded Tinsmith, offline). On a 2-core
# CPU the whole set takes about an hour; the per-step wall times are in each page.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TINKER_TELEMETRY=0
PY=.venv/bin/python
OUT=runs/curves

# name | module | key=value arguments | metrics to print
RECIPES=(
  "sl_loop|sl_loop||nll"
  "chat_sl|chat_sl||nll eval/nll"
  "dpo|dpo|max_steps=15|loss pair_accuracy margin eval/pair_accuracy eval/margin"
  "rlhf|rlhf|max_steps=12 learning_rate=5e-4 max_tokens=32|reward eval/reward kl_ref response_len"
  "math_rl|math_rl|max_steps=10 batch_size=4 group_size=4 max_tokens=64 eval_size=16|reward correct format eval/accuracy"
  "rl_loop|rl_loop|max_steps=10 max_tokens=64 learning_rate=5e-4|reward correct format"
  "distillation_off|distillation|mode=off_policy max_steps=10 batch_size=4 max_tokens=64 learning_rate=1e-3|loss kl teacher_entropy"
  "distillation_on|distillation|mode=on_policy max_steps=10 batch_size=4 group_size=2 max_tokens=64 learning_rate=1e-3|reverse_kl teacher_logprob student_logprob"
  "prompt_distillation|prompt_distillation||nll eval/nll eval/follows teacher_follows data_follows"
  "tool_use|tool_use|sft_steps=10 max_steps=8 batch_size=4 group_size=4 max_tokens=48|reward correct format tool_calls"
  "tool_use_search|tool_use|tool=search sft_steps=10 max_steps=8 batch_size=4 group_size=4 max_tokens=48|reward correct format tool_calls"
  # Baselines the pages compare with: the old learning rate, and tool use without a warm start.
  "rl_loop_lr1e-4|rl_loop|max_steps=10 max_tokens=64 learning_rate=1e-4|reward correct format"
  "distillation_on_lr1e-4|distillation|mode=on_policy max_steps=10 batch_size=4 group_size=2 max_tokens=64 learning_rate=1e-4|reverse_kl"
  "prompt_distillation_lr1e-4|prompt_distillation|learning_rate=1e-4|nll eval/nll eval/follows"
  "tool_use_nowarm|tool_use|max_steps=8 batch_size=4 group_size=4 max_tokens=48|reward correct format tool_calls"
  "multi_agent_nowarm|multi_agent|sft_steps=0 max_steps=6 batch_size=4 group_size=4|reward solved turns invalid_guesses mixed_groups"
  "multi_agent|multi_agent|sft_steps=10 max_steps=20 batch_size=4 group_size=4|reward solved turns invalid_guesses mixed_groups"
)

want=" $* "
for entry in "${RECIPES[@]}"; do
  IFS="|" read -r name module args metrics <<<"$entry"
  if [ $# -gt 0 ] && [[ "$want" != *" $name "* ]]; then continue; fi
  rm -rf "${OUT:?}/$name"
  mkdir -p "$OUT/logs"
  echo "== $name: python -m tinsmith.recipes.$module $args log_path=$OUT/$name"
  start=$(date +%s)
  # shellcheck disable=SC2086  # $args is a list of key=value words
  "$PY" -m "tinsmith.recipes.$module" $args "log_path=$OUT/$name" > "$OUT/logs/$name.log" 2>&1 \
    || { echo "   failed: see $OUT/logs/$name.log"; continue; }
  echo "   wall time $(( $(date +%s) - start )) s (server start and model load included)"
  # shellcheck disable=SC2086
  "$PY" -m tinsmith.cookbook.curves "$OUT/$name" $metrics
  # rlhf's first two stages are runs of their own, in sub-folders.
  if [ -d "$OUT/$name/sft" ]; then "$PY" -m tinsmith.cookbook.curves "$OUT/$name/sft" nll; fi
  if [ -d "$OUT/$name/reward_model" ]; then
    "$PY" -m tinsmith.cookbook.curves "$OUT/$name/reward_model" loss eval/pair_accuracy eval/margin
  fi
done
