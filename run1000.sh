#!/usr/bin/env bash
# The ~$1000 tier: the same stages as speedrun.sh with a depth-32 model (~1.9B parameters) on 8xH100,
# ~41 hours at the $24/h an 8xH100 node costs. Everything but the size comes from speedrun.sh, including
# resuming: rerun it after an interruption and finished stages are skipped.
#
#   bash run1000.sh                       # WANDB_RUN, NANOCHAT_BASE_DIR, SKIP_RL work as in speedrun.sh
#
# Sizing, derived the way base_train derives its horizon: depth 32 has 1.74B parameters without the value
# embeddings, so 20 tokens per parameter (Chinchilla) is 34.9B tokens, ~167B characters at ~4.8 characters
# per token, ~670 shards of ~250M characters: 800 leaves room for the val shard and a margin. At depth 32 a
# micro-batch of 32 rows of 2048 tokens does not fit in 80 GB: 8 rows, and gradient accumulation makes up
# the 0.5M-token batch (the optimisation is the same, only slower per step).
set -euo pipefail
cd "$(dirname "$0")"
if [ "${NANOCHAT_PROFILE:-gpu}" != gpu ]; then
    echo "run1000.sh is the GPU tier (8xH100); for the CPU or smoke profiles run speedrun.sh"; exit 1
fi
export NANOCHAT_PROFILE=gpu DEPTH="${DEPTH:-32}" NUM_SHARDS="${NUM_SHARDS:-800}" DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-8}"
exec bash speedrun.sh
