"""
CPU training throughput: our GPT + Muon/AdamW against a plain PyTorch reference GPT of the same size
(nanoGPT-style: learned positions, LayerNorm, GELU, fused qkv, plain cross-entropy, torch AdamW),
measured in the same run, alternating, so a busy machine slows both alike.

    python -m dev.bench_cpu_train                      # depth 4 and 6, seq 512, vocab 8192, batch 8
    python -m dev.bench_cpu_train --depths 4 --rounds 3 --threads 2 --grad-accums 1 --dtypes float32

The reference always runs in plain fp32. Ours runs in each of --dtypes: "auto" is what base_train
picks here (bf16 matmuls with fp32 master weights on CPUs with AMX, else fp32), "float32" is the
like-for-like comparison.

Muon's Newton-Schulz costs the same per optimizer step whatever the batch, so with one step per
4096-token batch it is a visible share of the step (more so as width grows); with accumulation it
fades. Both settings are printed.
"""
import argparse
import dataclasses
import itertools
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPES, autocast_context, get_compute_dtype
from nanochat.cpu_autograd import CPU_TRAINING_OPS
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.training import train_step


class ReferenceBlock(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.attn_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x))))


class ReferenceGPT(nn.Module):
    def __init__(self, vocab_size, sequence_len, n_layer, n_head, n_embd):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(sequence_len, n_embd)
        self.blocks = nn.ModuleList([ReferenceBlock(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets, loss_reduction="mean"):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=loss_reduction)


def make_step(model, optimizers, inputs, targets, grad_accum, autocast=nullcontext()):
    """One optimizer step through the training loop's own train_step (the reference goes through it too)."""
    batches = itertools.repeat((inputs, targets))
    muon_momentum = 0.95 if len(optimizers) > 1 else None  # ours is [AdamW, Muon]; the reference has AdamW only
    return lambda: train_step(model, optimizers, batches, grad_accum, autocast, 1.0, muon_momentum)[0].item()


def tokens_per_second(step, tokens, steps):
    """-> (tokens per wall-clock second, tokens per CPU second of this process).
    On a shared machine the second is steadier: time spent descheduled is not counted."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return tokens * steps / (time.perf_counter() - wall), tokens * steps / (time.process_time() - cpu)


def main():
    parser = argparse.ArgumentParser(description="CPU training tok/s: nanochat GPT vs a plain PyTorch GPT")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 6], help="model depths to measure")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median reported)")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per timing round")
    parser.add_argument("--grad-accums", type=int, nargs="+", default=[1, 2],
                        help="micro-batches per optimizer step to measure (the CPU speedrun profile uses 2: 8192 tokens per step)")
    parser.add_argument("--dtypes", type=str, nargs="+", default=["auto", "float32"], choices=COMPUTE_DTYPES,
                        help="compute dtypes to run ours in (the reference is always fp32)")
    parser.add_argument("--value-embeds", type=int, default=1, choices=[0, 1], help="ours with value embeddings (base_train's default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens = args.batch_size * args.seq_len
    inputs = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))
    targets = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))
    cpu = torch.device("cpu")
    print(f"threads {args.threads} | seq {args.seq_len} | batch {args.batch_size} | vocab {args.vocab_size} | "
          f"auto dtype here: {get_compute_dtype(cpu)}")
    for depth, dtype_name, grad_accum in ((d, t, g) for d in args.depths for t in args.dtypes for g in args.grad_accums):
        dtype = get_compute_dtype(cpu, dtype_name)
        # the model base_train trains (value embeddings on: extra lookups and AdamW entries, no extra matmuls)
        config = dataclasses.replace(model_config_from_depth(depth, args.vocab_size, args.seq_len), value_embeds=bool(args.value_embeds))
        torch.manual_seed(0)
        ours = GPT(config).use_ops(CPU_TRAINING_OPS)  # as training_setup.prepare_model sets it up on a CPU
        ours.init_weights()
        ours_optimizers = ours.setup_optimizers(compute_dtype=dtype)
        reference = ReferenceGPT(args.vocab_size, args.seq_len, config.n_layer, config.n_head, config.n_embd)
        reference_optimizers = [torch.optim.AdamW(reference.parameters(), lr=3e-4)]
        reference_optimizers[0].param_groups[0]["initial_lr"] = 3e-4  # what train_step's lr schedule scales
        ours_step = make_step(ours, ours_optimizers, inputs, targets, grad_accum, autocast_context(cpu, dtype))
        reference_step = make_step(reference, reference_optimizers, inputs, targets, grad_accum)
        ours_step(), reference_step()  # warm up allocator and kernels
        ours_rates, reference_rates = [], []
        for _ in range(args.rounds):
            ours_rates.append(tokens_per_second(ours_step, tokens * grad_accum, args.steps))
            reference_rates.append(tokens_per_second(reference_step, tokens * grad_accum, args.steps))
        ours_rate, reference_rate = (statistics.median(r[0] for r in rates) for rates in (ours_rates, reference_rates))
        ours_cpu, reference_cpu = (statistics.median(r[1] for r in rates) for rates in (ours_rates, reference_rates))
        gflops = ours.estimate_flops() * ours_rate / 1e9
        print(f"depth {depth} (width {config.n_embd}, {ours.num_params() / 1e6:.1f}M params), ours in {str(dtype).removeprefix('torch.')}, "
              f"{grad_accum} micro-batch(es)/step: "
              f"ours {ours_rate:,.0f} tok/s ({gflops:.0f} GFLOP/s) | reference {reference_rate:,.0f} tok/s | "
              f"ratio {ours_rate / reference_rate:.2f}x | per CPU-second: ours {ours_cpu:,.0f}, reference {reference_cpu:,.0f}, "
              f"ratio {ours_cpu / reference_cpu:.2f}x", flush=True)


if __name__ == "__main__":
    main()
