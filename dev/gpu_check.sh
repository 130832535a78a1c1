#!/usr/bin/env bash
# GPU check (one GPU, <= 12 minutes), in three parts:
#  1. speed: tok/s, MFU and peak memory of base pretraining steps at depth 12 and 20, then one midtraining
#     step (packed conversation rows, tool outputs masked) and SFT steps (padded rows of changing length,
#     eager), all through nanochat.training.train_step, bf16 + torch.compile, synthetic tokens.
#     Target: >= 45% MFU at depth 20 on an H100.
#  2. the pipeline: the real scripts end to end on CUDA at toy size, offline on the embedded sample and
#     the stand-ins (tok_train -> base_train -> mid_train -> chat_sft -> chat_eval -> chat_rl -> chat_cli -> chat_web).
#  3. serving: decode tok/s at depth 20 (batch 1 and 32, Engine.generate and continuous batching) and the chat server under
#     1/8/32 streaming clients (depth 12, random weights), all on CUDA.
#     bash dev/gpu_check.sh                          # uses $PYTHON or python
#     STEPS=30 DEPTHS="20" PIPELINE=0 SERVING=0 bash dev/gpu_check.sh
# Device time is scarce, so tests/test_gpu_check.py runs part 1 tiny on CPU (DEVICE=cpu COMPILE=0) and part 3's two
# benchmarks at depth 2 on CPU, and checks every command's flags against its script's --help (part 2's scripts
# themselves are tested on CPU elsewhere): an API drift fails in CI, not on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ "${DEVICE:-cuda}" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== 1. speed"
STEPS=${STEPS:-20} DEPTHS=${DEPTHS:-"12 20"} DEVICE_BATCH=${DEVICE_BATCH:-32} SEQ_LEN=${SEQ_LEN:-2048} VOCAB=${VOCAB:-32768} \
DEVICE=${DEVICE:-cuda} COMPILE=${COMPILE:-1} \
timeout ${SPEED_TIMEOUT:-330} "$PYTHON" - <<'PY' || echo "speed check FAILED or timed out (exit $?)"
import dataclasses, os, random, time
import torch
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.training import train_step
from nanochat.training_log import get_peak_flops

cuda = os.environ["DEVICE"] == "cuda"
assert torch.cuda.is_available() or not cuda, "no CUDA device: this check needs a GPU"
device = torch.device("cuda", 0) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
torch.set_float32_matmul_precision("high")
steps, batch, seq_len, vocab = (int(os.environ[k]) for k in ("STEPS", "DEVICE_BATCH", "SEQ_LEN", "VOCAB"))
peak = get_peak_flops(device)
autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
synchronize = torch.cuda.synchronize if cuda else lambda: None
print(f"{torch.cuda.get_device_name(device) if cuda else 'CPU'} | torch {torch.__version__} | "
      f"bf16 peak {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (MFU n/a)'}", flush=True)


def measure(name, model, compiled, optimizers, make_batch, steps, flops_per_token):
    batches = iter(make_batch, None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for _ in range(3):  # compile + warm up
        train_step(compiled, optimizers, batches, 1, autocast, 1.0, 0.95)[0].item()
    compile_s = time.time() - start
    synchronize()
    start, tokens = time.time(), 0
    for _ in range(steps):
        loss, positions = train_step(compiled, optimizers, batches, 1, autocast, 1.0, 0.95)
        tokens += positions
    loss = loss.item()
    dt = time.time() - start
    tok_per_sec = tokens / dt
    mfu = 100 * flops_per_token * tok_per_sec / peak if peak else float("nan")
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    print(f"{name:28s} | params {model.num_params() / 1e6:6.1f}M | compile+warmup {compile_s:5.1f}s | step {dt / steps * 1000:6.1f}ms | "
          f"tok/s {tok_per_sec:,.0f} | MFU {mfu:.1f}% | peak mem {peak_memory:.1f} GiB | loss {loss:.3f}", flush=True)


for depth in [int(d) for d in os.environ["DEPTHS"].split()]:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(dataclasses.replace(model_config_from_depth(depth, vocab, seq_len), value_embeds=True))  # base_train's default
    model.to_empty(device=device)
    model.init_weights()
    optimizers = model.setup_optimizers(compute_dtype=torch.bfloat16)
    compiled = torch.compile(model, dynamic=False) if os.environ["COMPILE"] == "1" else model
    flops = model.estimate_flops()
    base_batch = lambda: (torch.randint(0, vocab, (batch, seq_len), device=device), torch.randint(0, vocab, (batch, seq_len), device=device))
    measure(f"base depth {depth}", model, compiled, optimizers, base_batch, steps, flops)
    if depth != max(int(d) for d in os.environ["DEPTHS"].split()):
        continue

    def mid_batch():  # packed conversations: same shapes as pretraining, ~15% of the targets masked (tool outputs)
        inputs, targets = base_batch()
        return inputs, targets.masked_fill(torch.rand(targets.shape, device=device) < 0.15, -1)
    measure(f"mid step depth {depth}", model, compiled, optimizers, mid_batch, min(3, steps), flops)

    sft_rows = max(1, batch // 2)
    def sft_batch():  # one conversation per row, padded to the longest of the micro-batch (a multiple of 8)
        length = random.Random(torch.randint(0, 10**6, ()).item()).randrange(min(256, seq_len), seq_len + 1, 8)
        inputs, targets = torch.randint(0, vocab, (sft_rows, length), device=device), torch.randint(0, vocab, (sft_rows, length), device=device)
        lengths = torch.randint(length // 4, length + 1, (sft_rows, 1), device=device)
        return inputs, targets.masked_fill(torch.arange(length, device=device) >= lengths, -1)
    # eager, as chat_sft runs it: a dynamic-shape compile had not finished after ~3 minutes here
    measure(f"SFT steps depth {depth} (eager)", model, model, optimizers, sft_batch, min(8, steps), flops)
    del model, compiled, optimizers
    if cuda:
        torch.cuda.empty_cache()
PY

if [ "${PIPELINE:-1}" = 1 ]; then
echo "== 2. pipeline (toy size, offline data)"
export NANOCHAT_BASE_DIR=$(mktemp -d) NANOCHAT_DATA=sample
run() { echo "-- $*"; timeout ${STAGE_TIMEOUT:-150} "$PYTHON" -m "$@" 2>&1 | grep -v "^step 0000[2-9]\|^step 000[1-9]" | tail -${TAIL:-6} || echo "FAILED: $*"; }
run scripts.tok_train --vocab-size 4096
run scripts.base_train --depth 4 --max-seq-len 512 --device-batch-size 16 --total-batch-size 16384 --num-iterations 60 \
    --eval-every 30 --eval-tokens 65536 --sample-every -1
run scripts.mid_train --device-batch-size 16 --total-batch-size 16384 --num-iterations 30 --eval-every 15 --eval-tokens 65536 --stand-in-size 2000
run scripts.chat_sft --device-batch-size 8 --examples-per-step 32 --num-iterations 30 --eval-every 15 --eval-steps 10 --stand-in-size 1000
TAIL=8 run scripts.chat_eval -i sft --max-problems 64 --max-new-tokens 96
# RL: rollouts through the engine on CUDA (tools on), then pass@1 before/after; the log shows rollout tok/s
TAIL=8 run scripts.chat_rl --num-iterations 10 --examples-per-step 8 --num-samples 8 --max-new-tokens 96 \
    --eval-every 10 --eval-examples 32 --eval-samples 2
TAIL=4 run scripts.chat_eval -i rl -a Arithmetic --max-problems 32 --max-new-tokens 96
TAIL=4 run scripts.chat_cli -p "What is 12 times 4?" -t 0 --max-tokens 64
# the server on CUDA: one OpenAI-style request through continuous batching (nanochat/batching.py) and back
TAIL=2 run dev.smoke_chat_web
fi

[ "${SERVING:-1}" = 1 ] || exit 0
echo "== 3. serving"
timeout ${SERVING_TIMEOUT:-150} "$PYTHON" -m dev.bench_decode --device cuda --depth 20 --vocab-size 65536 --dtypes bfloat16 \
    --batch-sizes 1,32 --max-tokens 64 --repeats 2 --skip-naive 2>&1 | tail -4 || echo "decode bench FAILED or timed out"
timeout ${SERVING_TIMEOUT:-150} "$PYTHON" -m dev.bench_server --device-type cuda --depth 12 --clients 1,8,32 \
    --requests-per-client 2 2>&1 | grep "clients:\|Error\|error" || echo "server bench FAILED or timed out"
