#!/usr/bin/env bash
# The whole nanochat run, top to bottom. Every stage is one command you can copy and run by hand.
#
#   bash speedrun.sh                      # 8xH100: ~4 hours, ~$100 (GPU profile, depth 20)
#   WANDB_RUN=speedrun bash speedrun.sh   # same, logging to Weights & Biases
#
# tokenizer -> base model (pretraining) -> midtraining -> SFT -> RL, with evaluations after each, -> report.md.
#
# Knobs (environment variables):
#   NANOCHAT_PROFILE   gpu | cpu | smoke. Default: gpu when torch sees a GPU, else cpu.
#                      cpu:   a tiny model on the embedded sample corpus and the offline stand-ins for the chat
#                             data (NANOCHAT_DATA=sample), every stage, ~25-30 minutes on 2 cores.
#                      smoke: every stage at the smallest size that still exercises it (~2 minutes on 2 cores),
#                             then one chat_cli prompt and one request to a started chat_web. The tests run it.
#   DEPTH              the model's size dial on the GPU profile (default 20; run1000.sh uses 32)
#   DEVICE_BATCH_SIZE  rows per GPU per micro-step on the GPU profile (default 32; halve it if out of memory,
#                      gradient accumulation keeps the optimisation the same)
#   NUM_SHARDS         FineWeb-Edu shards to download on the GPU profile (default 240, enough for depth 20)
#   NUM_GPUS           GPUs to use (default: all that torch sees)
#   WANDB_RUN          a wandb run name (default: no wandb)
#   NANOCHAT_BASE_DIR  where everything is written (default ~/.cache/nanochat)
#   SKIP_RL=1          stop after SFT
#   DETERMINISTIC=1    train with --deterministic: a rerun or a resume gives the same bits on the same machine,
#                      compiled or not (without it only eager CPU runs do); slower, see dev/BENCHMARKS.md
#
# Resumable: every finished stage leaves a marker in $NANOCHAT_BASE_DIR/speedrun_stages/. Run the script
# again after an interruption (Ctrl-C, a lost node, a full disk) and it skips the finished stages and
# resumes the interrupted one from its last checkpoint; a second run of a finished speedrun only
# regenerates the report. docs/artifacts.md says what to delete to redo a stage.
set -euo pipefail
cd "$(dirname "$0")"

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export UV_PYTHON_DOWNLOADS=never  # use the machine's python3
WANDB_RUN="${WANDB_RUN:-dummy}"   # "dummy" switches wandb off
if [ "${DETERMINISTIC:-0}" = 1 ]; then DETERMINISTIC_FLAG=(--deterministic); else DETERMINISTIC_FLAG=(); fi
mkdir -p "$NANOCHAT_BASE_DIR"

# ---------------------------------------------------------------- setup
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then source "$HOME/.cargo/env"; fi
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
# --inexact: keep extras such as the test tools; plots: report curves; cpu-kernels: the chat server's CPU decode step
uv sync --python python3 --inexact --extra plots --extra cpu-kernels
source .venv/bin/activate
# a wandb run needs a login: find out now, not after the tokenizer and the base model's setup
if [ "$WANDB_RUN" != dummy ] && [ "${WANDB_MODE:-online}" = online ]; then
    python -c "import sys; from nanochat.common import wandb_logged_in; sys.exit(0 if wandb_logged_in() else 1)" || {
        echo "WANDB_RUN=$WANDB_RUN but wandb has no API key here: run 'wandb login' (or set WANDB_API_KEY),"
        echo "or set WANDB_MODE=offline (runs are kept in \$NANOCHAT_BASE_DIR/wandb), or unset WANDB_RUN."; exit 1; }
fi

if [ -z "${NANOCHAT_PROFILE:-}" ]; then
    if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then NANOCHAT_PROFILE=gpu; else NANOCHAT_PROFILE=cpu; fi
fi
PROFILE="$NANOCHAT_PROFILE"
case "$PROFILE" in
    gpu) NUM_GPUS="${NUM_GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
         [ "$NUM_GPUS" -ge 1 ] || { echo "NANOCHAT_PROFILE=gpu but torch sees no GPU: use NANOCHAT_PROFILE=cpu (or smoke)"; exit 1; }
         DEPTH="${DEPTH:-20}"; DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-32}"; NUM_SHARDS="${NUM_SHARDS:-240}"
         # torchrun starts one process per GPU; "--" ends torchrun's own flags
         LAUNCH=(torchrun --standalone --nproc_per_node="$NUM_GPUS") ;;
    cpu|smoke) export NANOCHAT_DATA=sample  # offline: the embedded corpus and the chat stand-ins, labelled as such
         LAUNCH=(python) ;;
    *) echo "NANOCHAT_PROFILE=$PROFILE is not a profile: use gpu, cpu or smoke"; exit 1 ;;
esac
echo "nanochat speedrun: $PROFILE profile, artifacts in $NANOCHAT_BASE_DIR"

# ---------------------------------------------------------------- stages that resume
# stage NAME [--resumable] [--optional] COMMAND...
# Runs COMMAND unless an earlier run finished it: the marker speedrun_stages/NAME.done (nanochat/stage_markers.py
# writes and reads it), written last and atomically, records the command, so a stage whose settings changed runs
# again. Once one stage has run, every later stage runs too: its input just changed. --resumable: a training stage
# that was interrupted (no marker) resumes from its last saved step. --optional: a failure is reported, not fatal
# (base_eval needs the internet for the CORE bundle).
MARKERS=(python -m nanochat.stage_markers)
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # an interrupted run leaves no download running behind it
EARLIER_STAGE_RAN=0
stage() {
    local name=$1 resumable=0 optional=0; shift
    while [[ "$1" == --resumable || "$1" == --optional ]]; do
        [ "$1" = --resumable ] && resumable=1 || optional=1; shift
    done
    local status=changed extra=()  # changed: after a stage that ran, this one's input did
    [ "$EARLIER_STAGE_RAN" = 1 ] || status=$("${MARKERS[@]}" status "$name" -- "$@")
    case "$status" in
        done)    echo "== $name: finished in an earlier run, skipped (docs/artifacts.md: how to redo a stage)"; return 0 ;;
        failed)  echo "== $name: failed (optional) in an earlier run, skipped (docs/artifacts.md: how to redo a stage)"; return 0 ;;
        missing) [ "$resumable" = 0 ] || extra=(--resume-if-saved) ;;  # interrupted: continue from its last checkpoint
    esac
    echo "== $name: $* ${extra[*]}"
    local started=$SECONDS result=done
    if ! "$@" "${extra[@]}"; then
        if [ "$optional" = 0 ]; then
            echo "== $name failed. Fix what the message above says, then rerun 'bash speedrun.sh': finished stages are skipped."
            exit 1
        fi
        # marked as settled all the same, so a rerun does not try again; delete the marker to retry it
        echo "== $name: failed, skipped (it is optional; see the message above)"; result=failed
    else
        EARLIER_STAGE_RAN=1
    fi
    "${MARKERS[@]}" write "$name" --seconds "$((SECONDS - started))" --result "$result" -- "$@"
}

# a run whose first stage has to run is a new run: fresh report, no markers from the last one
if [ "$("${MARKERS[@]}" status tokenizer)" = missing ] || [ ! -f "$NANOCHAT_BASE_DIR/report/header.md" ]; then
    "${MARKERS[@]}" clear
    python -m nanochat.report reset
fi

# ---------------------------------------------------------------- tokenizer
case "$PROFILE" in
    gpu)
        # ~2B characters of FineWeb-Edu for the tokenizer, then the rest of the shards in the background
        # (shards already on disk are kept: a rerun downloads only what is missing)
        python -m nanochat.dataset -n 8
        python -m nanochat.dataset -n "$NUM_SHARDS" &
        DATASET_DOWNLOAD_PID=$!
        stage tokenizer python -m scripts.tok_train --max-chars 2000000000 --vocab-size 32768 ;;
    cpu)   # no shards downloaded: everything reads the embedded sample corpus (nanochat/sample_data)
        stage tokenizer python -m scripts.tok_train --vocab-size 8192 ;;
    smoke) stage tokenizer python -m scripts.tok_train --vocab-size 2048 --max-chars 2000000 ;;
esac
stage tokenizer-eval python -m scripts.tok_eval

# ---------------------------------------------------------------- base model (pretraining)
case "$PROFILE" in
    gpu)
        wait "$DATASET_DOWNLOAD_PID"
        # a checkpoint every 2,000 steps (~20 minutes): what an interruption can cost
        stage base-train --resumable "${LAUNCH[@]}" -m scripts.base_train -- --depth "$DEPTH" \
            --device-batch-size "$DEVICE_BATCH_SIZE" --save-every 2000 --run "$WANDB_RUN" "${DETERMINISTIC_FLAG[@]}"
        stage base-loss "${LAUNCH[@]}" -m scripts.base_loss -- --device-batch-size "$DEVICE_BATCH_SIZE"
        stage base-eval "${LAUNCH[@]}" -m scripts.base_eval ;;
    cpu)
        # depth 4 (width 256), steps of 8192 tokens for 12 minutes of training: ~1.8M tokens on 2 cores in fp32,
        # ~3.2M with bf16 hardware (AVX512-BF16 or AMX), more on a faster CPU; the other stages take ~11-15 minutes, so
        # the whole profile stays within 30 minutes on 2 cores (dev/BENCHMARKS.md, "CPU recipe")
        stage base-train --resumable python -m scripts.base_train --depth 4 --max-seq-len 512 --device-batch-size 8 \
            --total-batch-size 8192 --time-budget 12 --eval-every 100 --eval-tokens 65536 --sample-every -1 \
            --save-every 100 --run "$WANDB_RUN" "${DETERMINISTIC_FLAG[@]}"
        stage base-loss python -m scripts.base_loss --device-batch-size 8 --split-tokens 131072
        # CORE needs the eval bundle from the internet: on an offline CPU box base_eval says so and is skipped
        stage base-eval --optional python -m scripts.base_eval --max-per-task 50 ;;
    smoke)
        # --compile 0: at 20 steps compiling (on CPUs with bf16 hardware) would take longer than the steps themselves
        stage base-train --resumable python -m scripts.base_train --depth 2 --max-seq-len 128 --device-batch-size 4 \
            --total-batch-size 1024 --num-iterations 20 --eval-every 20 --eval-tokens 4096 --sample-every -1 \
            --save-every 10 --compile 0 --run "$WANDB_RUN" "${DETERMINISTIC_FLAG[@]}"
        stage base-loss python -m scripts.base_loss --device-batch-size 4 --split-tokens 4096 --max-new-tokens 8
        stage base-eval --optional python -m scripts.base_eval --max-per-task 4 ;;
esac

# ---------------------------------------------------------------- midtraining, SFT and their chat evaluations
case "$PROFILE" in
    gpu)
        stage mid-train --resumable "${LAUNCH[@]}" -m scripts.mid_train -- --device-batch-size "$DEVICE_BATCH_SIZE" \
            --save-every 200 --run "$WANDB_RUN" "${DETERMINISTIC_FLAG[@]}"
        stage mid-eval "${LAUNCH[@]}" -m scripts.chat_eval -- -i mid
        stage sft --resumable "${LAUNCH[@]}" -m scripts.chat_sft -- --save-every 200 --run "$WANDB_RUN" "${DETERMINISTIC_FLAG[@]}"
        stage sft-eval "${LAUNCH[@]}" -m scripts.chat_eval -- -i sft ;;
    cpu)
        # one epoch of the stand-in mixture (~0.8M tokens, ~100 steps; FactQA three times: facts asked both ways),
        # then ~3,600 conversations of SFT
        stage mid-train --resumable python -m scripts.mid_train --device-batch-size 8 --total-batch-size 8192 \
            --eval-every 30 --eval-tokens 65536 --stand-in-size 1500 --save-every 30 --run "$WANDB_RUN" "${DETERMINISTIC_FLAG[@]}"
        stage mid-eval python -m scripts.chat_eval -i mid --max-problems 64 --max-new-tokens 256
        stage sft --resumable python -m scripts.chat_sft --device-batch-size 4 --examples-per-step 16 --eval-every 50 \
            --eval-steps 25 --eval-max-problems 128 --stand-in-size 500 --save-every 50 --run "$WANDB_RUN" "${DETERMINISTIC_FLAG[@]}"
        stage sft-eval python -m scripts.chat_eval -i sft --max-problems 64 --max-new-tokens 256 ;;
    smoke)
        stage mid-train --resumable python -m scripts.mid_train --max-seq-len 128 --device-batch-size 4 \
            --total-batch-size 1024 --num-iterations 10 --eval-every 10 --eval-tokens 2048 --stand-in-size 60 \
            --save-every 5 --compile 0 --run "$WANDB_RUN" "${DETERMINISTIC_FLAG[@]}"
        stage mid-eval python -m scripts.chat_eval -i mid --max-problems 4 --max-new-tokens 16
        stage sft --resumable python -m scripts.chat_sft --max-seq-len 128 --device-batch-size 4 --examples-per-step 8 \
            --num-iterations 10 --eval-every 10 --eval-steps 2 --eval-max-problems 4 --stand-in-size 40 \
            --save-every 5 --run "$WANDB_RUN" "${DETERMINISTIC_FLAG[@]}"
        stage sft-eval python -m scripts.chat_eval -i sft --max-problems 4 --max-new-tokens 16 ;;
esac

# ---------------------------------------------------------------- RL on GSM8K (SKIP_RL=1 skips it)
if [ "${SKIP_RL:-0}" != 1 ]; then
    case "$PROFILE" in
        gpu)
            stage rl --resumable "${LAUNCH[@]}" -m scripts.chat_rl -- --save-every 60 --run "$WANDB_RUN" "${DETERMINISTIC_FLAG[@]}"
            stage rl-eval "${LAUNCH[@]}" -m scripts.chat_eval -- -i rl -a GSM8K ;;
        cpu)
            # 32 steps of 4 questions x 8 samples (~2 min); pass@1 on 100 held-out arithmetic problems before and
            # after (3 seeds of this, evaluated on 200 x 4 samples: 0.609 -> 0.630 / 0.669 / 0.681, dev/BENCHMARKS.md)
            stage rl --resumable python -m scripts.chat_rl --num-iterations 32 --examples-per-step 4 --num-samples 8 \
                --max-new-tokens 128 --eval-every 32 --eval-examples 100 --eval-samples 2 --save-every 16 \
                --run "$WANDB_RUN" "${DETERMINISTIC_FLAG[@]}"
            stage rl-eval python -m scripts.chat_eval -i rl -a Arithmetic --max-problems 64 --max-new-tokens 256 ;;
        smoke)
            stage rl --resumable python -m scripts.chat_rl --num-iterations 2 --examples-per-step 2 --num-samples 2 \
                --max-new-tokens 16 --eval-every 2 --eval-examples 4 --eval-samples 1 --stand-in-size 100 \
                --save-every 1 --run "$WANDB_RUN" "${DETERMINISTIC_FLAG[@]}"
            stage rl-eval python -m scripts.chat_eval -i rl -a Arithmetic --max-problems 4 --max-new-tokens 16 ;;
    esac
fi

# ---------------------------------------------------------------- report card
python -m nanochat.report generate

if [ "$PROFILE" = smoke ]; then
    # the two ways to talk to the model, exercised once: a prompt in the terminal, a request to the server
    python -m scripts.chat_cli -p "Hello" --max-tokens 16
    python -m dev.smoke_chat_web
fi

cat <<'MSG'

Done. The report card is in ./report.md.
Talk to your model:
  source .venv/bin/activate
  python -m scripts.chat_cli                          # in the terminal (the most advanced model; -i base|mid|sft|rl)
  python -m scripts.chat_web                          # ChatGPT-like page on http://localhost:8000
MSG
