#!/usr/bin/env bash
# The seed guide's three workflows, on Tinker (TINKER_API_KEY set) or a stand-in of it
# (`.venv/bin/python -m dpo_core.local serve --stand-in tinker`, then what it prints to export).
#
#   scripts/train_dpo_examples.sh 1|2|3      # one workflow; no argument prints this help
#
# The guide's Qwen/Qwen3-4B-Instruct-2507 is retired on Tinker: the single runs use Qwen/Qwen3-8B, which it
# still serves. Workflow 3 is the suite with its default models, which replaces retired ones by their
# documented successors (announced in the log and the report; see README "Tinker's lineup").
# Extra key=value arguments after the number go to every command and win over the ones here, e.g.
# `... 2 batch_size=64`. batch_size=8: the shipped datasets have 140 pairs, on which the guide's 256 is one
# optimizer step (refused: fewer than 10); with your own data of 2,300+ pairs, pass batch_size=256.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${DPO_PYTHON:-.venv/bin/python}"  # the project's interpreter (make install)
WANDB="${WANDB_PROJECT_NAME:-cs329x-dpo}"
workflow="${1:-}"
shift || true

case "$workflow" in
  1)  # Workflow 1: single experiment
    "$PY" scripts/train_dpo.py model_name=Qwen/Qwen3-8B dataset=1 batch_size=8 wandb_project="$WANDB" "$@"
    ;;
  2)  # Workflow 2: hyperparameter tuning (the reference logprobs are computed once, shared by all three)
    for beta in 0.1 0.2 0.05; do
      "$PY" scripts/train_dpo.py model_name=Qwen/Qwen3-8B dataset=1 dpo_beta="$beta" batch_size=8 \
        wandb_project="$WANDB" "$@"
    done
    ;;
  3)  # Workflow 3: full experiment suite, 3 datasets x the default models (one Prefect flow run)
    "$PY" flows/suite.py datasets=1,2,3 batch_size=8 wandb_project="$WANDB" "$@"
    ;;
  help|-h|--help)
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"
    ;;
  *)
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2
    exit 2
    ;;
esac
