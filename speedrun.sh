#!/usr/bin/env bash
# The whole nanochat run, top to bottom. Every stage is one command you can copy and run by hand.
#
#   bash speedrun.sh                      # 8xH100: ~4 hours, ~$100 (GPU profile, depth 20)
#   WANDB_RUN=speedrun bash speedrun.sh   # same, logging to Weights & Biases
#
# tokenizer -> base model (pretraining) -> midtraining -> SFT -> RL, with evaluations after each, -> report.md.
# SKIP_RL=1 stops after SFT.
# On a machine without a GPU it runs the CPU profile instead: a tiny model trained on the embedded
# sample corpus and the offline stand-ins for the chat data (NANOCHAT_DATA=sample), ~28 minutes on 2
# cores, so the whole pipeline can be tried on a laptop.
set -euo pipefail
cd "$(dirname "$0")"

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export UV_PYTHON_DOWNLOADS=never  # use the machine's python3
WANDB_RUN="${WANDB_RUN:-dummy}"   # "dummy" switches wandb off
mkdir -p "$NANOCHAT_BASE_DIR"

# ---------------------------------------------------------------- setup
if ! command -v cargo >/dev/null 2>&1; then
    echo "Rust is needed to build the tokenizer trainer; installing it with rustup..."
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y \
        || { echo "Could not install Rust: install it from https://rustup.rs and rerun."; exit 1; }
    source "$HOME/.cargo/env"
fi
command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
# bubblewrap contains the Python the model writes (tool calls, HumanEval); without it a weaker sandbox runs
if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq bubblewrap >/dev/null 2>&1 || echo "Could not install bubblewrap (apt-get install bubblewrap): model-written code will run in the weak sandbox."
fi
uv sync --python python3 --inexact  # --inexact: keep extras such as the test tools
source .venv/bin/activate
# a wandb run needs a login: find out now, not after the tokenizer and the base model's setup
if [ "$WANDB_RUN" != dummy ] && [ "${WANDB_MODE:-online}" = online ]; then
    python -c "import sys; from nanochat.common import wandb_logged_in; sys.exit(0 if wandb_logged_in() else 1)" || {
        echo "WANDB_RUN=$WANDB_RUN but wandb has no API key here: run 'wandb login' (or set WANDB_API_KEY),"
        echo "or set WANDB_MODE=offline (runs are kept in \$NANOCHAT_BASE_DIR/wandb), or unset WANDB_RUN."; exit 1; }
fi

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    PROFILE=gpu
    NUM_GPUS="${NUM_GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
else
    PROFILE=cpu
    export NANOCHAT_DATA=sample  # offline: the embedded corpus and the chat stand-ins, labelled as such
fi
echo "nanochat speedrun: $PROFILE profile, artifacts in $NANOCHAT_BASE_DIR"
python -m nanochat.report reset

# ---------------------------------------------------------------- tokenizer
if [ "$PROFILE" = gpu ]; then
    # ~2B characters of FineWeb-Edu for the tokenizer, then the rest of the shards in the background
    python -m nanochat.dataset -n 8
    python -m nanochat.dataset -n 240 &
    DATASET_DOWNLOAD_PID=$!
    python -m scripts.tok_train --max-chars 2000000000 --vocab-size 32768
else
    # no shards downloaded: everything reads the embedded sample corpus (nanochat/sample_data)
    python -m scripts.tok_train --vocab-size 8192
fi
python -m scripts.tok_eval

# ---------------------------------------------------------------- base model (pretraining)
if [ "$PROFILE" = gpu ]; then
    wait "$DATASET_DOWNLOAD_PID"
    torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.base_train -- --depth 20 --run "$WANDB_RUN"
    torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.base_loss
    torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.base_eval
else
    # depth 4 (width 256), 200 steps of 8192 tokens: ~1.6M tokens, about half a pass over the sample
    python -m scripts.base_train --depth 4 --max-seq-len 512 --device-batch-size 8 --total-batch-size 8192 \
        --num-iterations 200 --eval-every 100 --eval-tokens 65536 --sample-every 200 --save-every 100 --run "$WANDB_RUN"
    python -m scripts.base_loss --device-batch-size 8 --split-tokens 131072
    # CORE needs the eval bundle from the internet: on an offline CPU box base_eval says so and is skipped
    python -m scripts.base_eval --max-per-task 50 || echo "base_eval skipped (see the message above)"
fi

# ---------------------------------------------------------------- midtraining, SFT and their chat evaluations
if [ "$PROFILE" = gpu ]; then
    torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.mid_train -- --run "$WANDB_RUN"
    torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.chat_eval -- -i mid
    torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.chat_sft -- --run "$WANDB_RUN"
    torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.chat_eval -- -i sft
else
    # one epoch of the stand-in mixture (~0.5M tokens, 60 steps), then ~2,600 conversations of SFT
    python -m scripts.mid_train --device-batch-size 8 --total-batch-size 8192 --eval-every 30 --eval-tokens 65536 \
        --stand-in-size 1500 --run "$WANDB_RUN"
    python -m scripts.chat_eval -i mid --max-problems 64 --max-new-tokens 256
    python -m scripts.chat_sft --device-batch-size 4 --examples-per-step 16 --eval-every 50 --eval-steps 25 \
        --eval-max-problems 128 --stand-in-size 500 --run "$WANDB_RUN"
    python -m scripts.chat_eval -i sft --max-problems 64 --max-new-tokens 256
fi

# ---------------------------------------------------------------- RL on GSM8K (SKIP_RL=1 skips it)
if [ "${SKIP_RL:-0}" != 1 ]; then
    if [ "$PROFILE" = gpu ]; then
        torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.chat_rl -- --run "$WANDB_RUN"
        torchrun --standalone --nproc_per_node="$NUM_GPUS" -m scripts.chat_eval -- -i rl -a GSM8K
    else
        # 32 steps of 4 questions x 8 samples (~2 min); pass@1 on 100 held-out arithmetic problems before and after
        # (3 seeds of this, evaluated on 200 x 4 samples: 0.609 -> 0.630 / 0.669 / 0.681, dev/BENCHMARKS.md)
        python -m scripts.chat_rl --num-iterations 32 --examples-per-step 4 --num-samples 8 --max-new-tokens 128 \
            --eval-every 32 --eval-examples 100 --eval-samples 2 --run "$WANDB_RUN"
        python -m scripts.chat_eval -i rl -a Arithmetic --max-problems 64 --max-new-tokens 256
    fi
fi

# ---------------------------------------------------------------- report card
python -m nanochat.report generate

cat <<'MSG'

Done. The report card is in ./report.md.
Talk to your model:
  source .venv/bin/activate
  python -m scripts.chat_cli                          # in the terminal (the most advanced model; -i base|mid|sft|rl)
  python -m scripts.chat_web                          # ChatGPT-like page on http://localhost:8000
MSG
