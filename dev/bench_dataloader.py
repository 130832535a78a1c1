"""
Is the pretraining loader fast enough? Its tokens/s on ONE core (tokenizing + best-fit packing, one
tokenizer thread, the process pinned to one CPU) next to what training consumes per rank:
  - the depth-4 CPU profile (vocab 8192, seq 512, batch 8): a real training step measured in this run;
  - depth 20 on 8xH100 (vocab 32768, seq 2048): about 130k tokens/s per rank (a constant; change it
    with --gpu-tokens-per-second).
The loader should be at least 3x faster than what it feeds.

    python -m dev.bench_dataloader
    python -m dev.bench_dataloader --batches 40 --train-steps 5
"""
import argparse
import os
import time

import torch

from nanochat.dataloader import PretrainLoader
from nanochat.dataset import list_parquet_files, parquets_iter_batched
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.tokenizer import RustBPETokenizer


def train_tokenizer(vocab_size, max_chars):
    """A tokenizer of the vocab size the profile uses, trained on the start of the train split."""
    def texts():
        total = 0
        for batch in parquets_iter_batched("train"):
            for text in batch:
                yield text
                total += len(text)
                if total >= max_chars:
                    return
    start = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(texts(), vocab_size)
    print(f"trained a {vocab_size}-token tokenizer on {max_chars / 1e6:.0f}M chars in {time.time() - start:.1f}s")
    return tokenizer


def loader_tokens_per_second(tokenizer, batch_size, seq_len, num_batches):
    loader = PretrainLoader(tokenizer, batch_size, seq_len, "train", rank=0, world_size=1, tokenizer_threads=1)
    next(loader)  # opens the first shard, fills the buffer
    start = time.perf_counter()
    for _ in range(num_batches):
        next(loader)
    elapsed = time.perf_counter() - start
    return batch_size * seq_len * num_batches / elapsed, loader.cropped_fraction


def cpu_train_tokens_per_second(vocab_size, batch_size, seq_len, num_steps):
    """Forward + backward + optimizer step of the depth-4 model, timed after one warm-up step."""
    model = GPT(model_config_from_depth(4, vocab_size, seq_len))
    model.init_weights()
    optimizers = model.setup_optimizers()
    inputs = torch.randint(0, vocab_size, (batch_size, seq_len))
    targets = torch.randint(0, vocab_size, (batch_size, seq_len))

    def step():
        model(inputs, targets).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(num_steps):
        step()
    return batch_size * seq_len * num_steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description="Dataloader tokens/s on one core vs what training consumes")
    parser.add_argument("--batches", type=int, default=20, help="loader batches to time per configuration")
    parser.add_argument("--train-steps", type=int, default=3, help="depth-4 CPU training steps to time")
    parser.add_argument("--train-threads", type=int, default=os.cpu_count(), help="torch threads for the CPU training step")
    parser.add_argument("--tokenizer-chars", type=float, default=4e6, help="characters to train the benchmark tokenizers on")
    parser.add_argument("--gpu-tokens-per-second", type=float, default=130_000, help="what one H100 rank consumes at depth 20")
    args = parser.parse_args()
    print(f"data: {', '.join(os.path.basename(f) for f in list_parquet_files())} (set NANOCHAT_DATA=sample to force the embedded sample)")

    cpu_tokenizer = train_tokenizer(8192, int(args.tokenizer_chars))
    gpu_tokenizer = train_tokenizer(32768, int(args.tokenizer_chars))

    torch.set_num_threads(args.train_threads)
    train_rate = cpu_train_tokens_per_second(8192, 8, 512, args.train_steps)
    print(f"depth-4 CPU training step ({args.train_threads} threads, batch 8 x 512): {train_rate:,.0f} tokens/s")

    # from here on the whole process (tokenizer threads included) runs on a single core
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    cpu_rate, cpu_cropped = loader_tokens_per_second(cpu_tokenizer, 8, 512, args.batches)
    gpu_rate, gpu_cropped = loader_tokens_per_second(gpu_tokenizer, 8, 2048, args.batches)

    print()
    print(f"{'profile':34s} {'loader tok/s (1 core)':>22s} {'training tok/s':>15s} {'ratio':>7s} {'cropped':>8s}")
    print(f"{'CPU depth 4, vocab 8192, T=512':34s} {cpu_rate:22,.0f} {train_rate:15,.0f} {cpu_rate / train_rate:6.1f}x {cpu_cropped:8.1%}")
    print(f"{'8xH100 depth 20, vocab 32768, T=2048':34s} {gpu_rate:22,.0f} {args.gpu_tokens_per_second:15,.0f} "
          f"{gpu_rate / args.gpu_tokens_per_second:6.1f}x {gpu_cropped:8.1%}")
    for name, ratio in [("CPU", cpu_rate / train_rate), ("GPU", gpu_rate / args.gpu_tokens_per_second)]:
        print(f"{name}: {'OK' if ratio >= 3 else 'TOO SLOW'} (need >= 3x)")


if __name__ == "__main__":
    main()
