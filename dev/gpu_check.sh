#!/usr/bin/env bash
# GPU check for base pretraining (one GPU, <= 8 minutes): tok/s, MFU and peak memory at depth 12
# and 20, ~50 steps each, bf16 autocast + torch.compile, the real GPT and Muon/AdamW, synthetic
# tokens (nothing to download). Target: >= 45% MFU at depth 20 on an H100.
#     bash dev/gpu_check.sh                       # uses $PYTHON or python
#     STEPS=30 DEPTHS="20" bash dev/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
STEPS=${STEPS:-50} DEPTHS=${DEPTHS:-"12 20"} DEVICE_BATCH=${DEVICE_BATCH:-32} SEQ_LEN=${SEQ_LEN:-2048} VOCAB=${VOCAB:-32768} \
PYTHONPATH=. timeout 470 "$PYTHON" - <<'PY'
import dataclasses, os, time
import torch
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.training import get_peak_flops

assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
device = torch.device("cuda", 0)
torch.cuda.set_device(device)
torch.set_float32_matmul_precision("high")
steps, batch, seq_len, vocab = (int(os.environ[k]) for k in ("STEPS", "DEVICE_BATCH", "SEQ_LEN", "VOCAB"))
peak = get_peak_flops(device)
print(f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | bf16 peak {peak and peak / 1e12:.0f} TFLOP/s")
for depth in [int(d) for d in os.environ["DEPTHS"].split()]:
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    with torch.device("meta"):
        model = GPT(dataclasses.replace(model_config_from_depth(depth, vocab, seq_len), value_embeds=True))  # base_train's default
    model.to_empty(device=device)
    model.init_weights()
    optimizers = model.setup_optimizers(compute_dtype=torch.bfloat16)
    compiled = torch.compile(model, dynamic=False)
    inputs = torch.randint(0, vocab, (batch, seq_len), device=device)
    targets = torch.randint(0, vocab, (batch, seq_len), device=device)

    def step():
        with torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = compiled(inputs, targets)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    start = time.time()
    for _ in range(3):  # compile + warm up
        step()
    torch.cuda.synchronize()
    compile_s = time.time() - start
    start = time.time()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.time() - start) / steps
    tok_per_sec = batch * seq_len / dt
    mfu = 100 * model.estimate_flops() * tok_per_sec / peak if peak else float("nan")
    print(f"depth {depth:2d} | params {model.num_params() / 1e6:6.1f}M | batch {batch}x{seq_len} | compile+warmup {compile_s:5.1f}s | "
          f"step {dt * 1000:6.1f}ms | tok/s {tok_per_sec:,.0f} | MFU {mfu:.1f}% | peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB | "
          f"loss {loss.item():.3f}", flush=True)
    del model, compiled, optimizers
    torch.cuda.empty_cache()
PY
