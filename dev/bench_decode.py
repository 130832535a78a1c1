"""
Decode speed of the engine: tokens/s at batch 1 and 8, with the KV cache (Engine.generate) and
without it (GPT.generate-style full recompute of the whole sequence every step), plus the ratio;
the same through the server's continuous batching (nanochat/batching.py: rows at their own positions; on a CPU
in float32 both run the CPU decoder's Rust kernels); for each weight dtype asked for, against the memory-bandwidth limit
(measured read bandwidth / bytes of weights read per token).

A random-init model is fine: decode speed does not depend on the weights. Sampling is greedy
with stops disabled (the end tokens are out of the random model's reach), so every run decodes
exactly --max-tokens tokens.

    python -m dev.bench_decode                      # CPU, depth 4, vocab 8192, fp32 and bf16 weights
    python -m dev.bench_decode --device cuda --depth 20 --vocab-size 65536 --dtypes bfloat16 --batch-sizes 1,32   # a GPU
"""
import argparse
import copy
import threading
import time

import torch

from nanochat.engine import Engine, prepare_for_inference
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.batching import GenerationRequest, Batcher

parser = argparse.ArgumentParser(description="KV-cache decode benchmark")
parser.add_argument("--depth", type=int, default=4, help="model depth (the single size dial)")
parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size")
parser.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens")
parser.add_argument("--max-tokens", type=int, default=256, help="tokens to decode per run")
parser.add_argument("--device", type=str, default="cpu", help="cpu | cuda | mps")
parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (the best is reported)")
parser.add_argument("--skip-naive", action="store_true", help="skip the no-cache baseline (slow for big models)")
parser.add_argument("--batch-sizes", type=str, default="1,8", help="comma-separated decode batch sizes (rows per step)")
parser.add_argument("--dtypes", type=str, default="float32,bfloat16",
                    help="comma-separated weight dtypes to measure (auto: what the chat server picks here)")
parser.add_argument("--decoders", type=str, default="auto",
                    help="comma-separated decode paths: auto (the CPU decoder where it runs), torch (always GPT.forward)")
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

    def get_special_tokens(self):
        return set(self.ids)

    def decode(self, ids):  # the batcher turns tokens into text as it goes; any text will do here
        return "x" * len(ids)


def read_bandwidth_gbs():
    """Memory read bandwidth: the best of a few sums over 512 MB (far past any cache)."""
    data = torch.ones(128 * 2**20, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        data.sum().item()
        best = min(best, time.perf_counter() - t0)
    return data.numel() * 4 / best / 1e9


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


config = model_config_from_depth(args.depth, args.vocab_size, sequence_len=2048)
with torch.device("meta"):
    model = GPT(config)
model.to_empty(device=device)
model.init_weights()
# random non-zero weights everywhere (zero-init projections would make every layer a shortcut)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
model.eval()
bandwidth = read_bandwidth_gbs()
print(f"depth {args.depth}, width {config.n_embd}, vocab {args.vocab_size}, {model.num_params() / 1e6:.1f}M params, "
      f"device {device}, threads {args.threads}, read bandwidth {bandwidth:.1f} GB/s")
prompt = torch.randint(0, args.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()


def time_engine(engine, batch_size):
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


def time_batcher(batcher, batch_size):
    """batch_size requests submitted together: each its own row (own prefill, own slot), as the web server runs them."""
    best = float("inf")
    for _ in range(args.repeats + 1):
        done = threading.Semaphore(0)
        requests = [GenerationRequest(prompt=prompt, max_tokens=args.max_tokens, temperature=0.0,
                                      emit=lambda *event: event[0] == "end" and done.release()) for _ in range(batch_size)]
        t0 = time.perf_counter()
        for request in requests:
            batcher.submit(request)
        for _ in requests:
            done.acquire()
        best = min(best, time.perf_counter() - t0)
    return batch_size * args.max_tokens / best


@torch.inference_mode()
def time_naive(engine, batch_size):
    # the no-cache baseline: recompute the whole sequence for every new token (what GPT.generate does)
    autocast = engine.autocast
    best = float("inf")
    for _ in range(args.repeats + 1):
        ids = torch.tensor([prompt] * batch_size, dtype=torch.long, device=device)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.max_tokens):
            with autocast:
                logits = engine.model(ids)[:, -1, :]
            next_ids = torch.argmax(logits, dim=-1, keepdim=True)
            next_ids.tolist()  # the engine also looks at every token on the host
            ids = torch.cat([ids, next_ids], dim=1)
        sync()
        best = min(best, time.perf_counter() - t0)
    return batch_size * args.max_tokens / best


for decoder_name, dtype_name in [(d, t) for d in args.decoders.split(",") for t in args.dtypes.split(",")]:
    # the inference copy the chat server makes (engine.prepare_for_inference): on a CPU with the CPU decoder, float32
    # weights and the decoder's own copy in dtype_name; otherwise the model itself in the training rule's dtype
    typed_model, decode_path = prepare_for_inference(copy.deepcopy(model), dtype_name, decoder_name)
    engine = Engine(typed_model, SpecialTokensOnly(args.vocab_size), **decode_path)
    read_dtype = engine.cpu_decoder.weight_dtype if engine.cpu_decoder is not None else next(typed_model.parameters()).dtype
    weight_bytes = sum(p.numel() * torch.finfo(read_dtype).bits // 8 for p in typed_model.parameters()
                       if p is not typed_model.transformer.wte.weight)  # the embedding is a lookup: one row per token
    limit = bandwidth * 1e9 / weight_bytes
    print(f"{decoder_name}/{dtype_name}: {engine.describe()}: {weight_bytes / 1e6:.0f} MB of weights read per decode step: "
          f"bandwidth limit {limit:.0f} tok/s at batch 1")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    batcher = Batcher([engine], max_batch=max(batch_sizes), queue_size=max(batch_sizes))
    for batch_size in batch_sizes:
        cached = time_engine(engine, batch_size)
        line = f"  batch {batch_size}: KV cache {cached:8.1f} tok/s"
        if not args.skip_naive:
            naive = time_naive(engine, batch_size)
            line += f" | no cache {naive:8.1f} tok/s | ratio {cached / naive:5.1f}x"
        line += f" | batching {time_batcher(batcher, batch_size):8.1f} tok/s"
        if batch_size == 1:
            line += f" | {weight_bytes * cached / 1e9:.1f} GB/s of weight reads, {cached / limit:.0%} of the limit"
        print(line, flush=True)
    batcher.close()
