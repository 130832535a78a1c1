"""
Decode speed of the engine: tokens/s at batch 1 and 8, with the KV cache (Engine.generate) and
without it (GPT.generate-style full recompute of the whole sequence every step), plus the ratio.

A random-init model is fine: decode speed does not depend on the weights. Sampling is greedy
with stops disabled (the end tokens are out of the random model's reach), so every run decodes
exactly --max-tokens tokens.

    python -m dev.bench_decode                      # CPU, depth 4, vocab 8192, fp32
    python -m dev.bench_decode --device cuda --depth 20 --vocab-size 65536   # on a GPU (bf16 autocast)
"""
import argparse
import time

import torch

from nanochat.engine import Engine, prepare_for_inference
from nanochat.gpt import GPT, model_config_from_depth

parser = argparse.ArgumentParser(description="KV-cache decode benchmark")
parser.add_argument("--depth", type=int, default=4, help="model depth (the single size dial)")
parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size")
parser.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens")
parser.add_argument("--max-tokens", type=int, default=256, help="tokens to decode per run")
parser.add_argument("--device", type=str, default="cpu", help="cpu | cuda | mps")
parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (the best is reported)")
parser.add_argument("--skip-naive", action="store_true", help="skip the no-cache baseline (slow for big models)")
args = parser.parse_args()
torch.set_num_threads(args.threads)
device = torch.device(args.device)


class SpecialTokensOnly:
    """The engine needs only the special-token ids from a tokenizer; put them at the top of the vocab, never sampled here."""

    def __init__(self, vocab_size):
        names = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                 "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
        self.ids = {name: vocab_size + i for i, name in enumerate(names)}  # beyond the vocab: never sampled

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]


config = model_config_from_depth(args.depth, args.vocab_size, sequence_len=2048)
with torch.device("meta"):
    model = GPT(config)
model.to_empty(device=device)
model.init_weights()
# random non-zero weights everywhere (zero-init projections would make every layer a shortcut)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
model = prepare_for_inference(model)  # bf16 weights on a GPU, as chat_cli/chat_web serve them
num_params = model.num_params()
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                   if p is not model.transformer.wte.weight)  # the embedding is a lookup: one row per token
print(f"depth {args.depth}, width {config.n_embd}, vocab {args.vocab_size}, {num_params / 1e6:.1f}M params, "
      f"{weight_bytes / 1e6:.0f} MB of weights read per decode step, device {device}, threads {args.threads}")
engine = Engine(model, SpecialTokensOnly(args.vocab_size))
prompt = torch.randint(0, args.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_engine(batch_size):
    best = float("inf")
    for _ in range(args.repeats + 1):  # the first run warms up allocator and kernels
        sync()
        t0 = time.perf_counter()
        steps = 0
        for _column, _masks in engine.generate(prompt, num_samples=batch_size, max_tokens=args.max_tokens, temperature=0.0):
            steps += 1
        sync()
        best = min(best, time.perf_counter() - t0)
    assert steps == args.max_tokens
    return batch_size * steps / best


@torch.inference_mode()
def time_naive(batch_size):
    # the no-cache baseline: recompute the whole sequence for every new token (what GPT.generate does)
    autocast = engine._autocast(device)
    best = float("inf")
    for _ in range(args.repeats + 1):
        ids = torch.tensor([prompt] * batch_size, dtype=torch.long, device=device)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.max_tokens):
            with autocast:
                logits = model(ids)[:, -1, :]
            next_ids = torch.argmax(logits, dim=-1, keepdim=True)
            next_ids.tolist()  # the engine also looks at every token on the host
            ids = torch.cat([ids, next_ids], dim=1)
        sync()
        best = min(best, time.perf_counter() - t0)
    return batch_size * args.max_tokens / best


for batch_size in (1, 8):
    cached = time_engine(batch_size)
    line = f"batch {batch_size}: KV cache {cached:8.1f} tok/s"
    if not args.skip_naive:
        naive = time_naive(batch_size)
        line += f" | no cache {naive:8.1f} tok/s | ratio {cached / naive:5.1f}x"
    if batch_size == 1:
        line += f" | {weight_bytes * cached / 1e9:.1f} GB/s of weight reads"
    print(line, flush=True)
