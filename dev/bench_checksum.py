"""
What the checkpoint records (size + sha256, nanochat/artifacts.py) cost: save_checkpoint and load_checkpoint
with the records, and with them switched off (file_record stubbed out: what a checkpoint was before), and
sha256 alone. Save times include the meta's fsync, which also flushes the model file: disk speed, not hashing.

    python -m dev.bench_checksum              # 16 x 32 MiB fp32 tensors: a ~537 MB file
    python -m dev.bench_checksum --mib 2048   # a d20-sized model file
"""
import argparse
import os
import shutil
import tempfile
import time

import torch

import nanochat.checkpoint_manager as checkpoint_manager
from nanochat.artifacts import file_record
from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint

parser = argparse.ArgumentParser(description="Time the checkpoint checksums")
parser.add_argument("--mib", type=int, default=512, help="size of the state dict in MiB (fp32, 32 MiB tensors)")
parser.add_argument("--trials", type=int, default=3, help="repetitions (the first one also pays for page-cache growth)")
args = parser.parse_args()

state = {f"w{i}": torch.randn(1024, 8 * 1024) for i in range(max(1, args.mib // 32))}
directory = tempfile.mkdtemp(prefix="bench_checksum_")


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def save_and_load(step, records):
    """(save seconds, load seconds) of one checkpoint step, with or without its records."""
    checkpoint_manager.file_record = file_record if records else lambda path: None  # None: nothing recorded, nothing checked
    save = seconds(lambda: save_checkpoint(directory, step, state, None, {"step": step}))
    load = seconds(lambda: load_checkpoint(directory, step, "cpu"))
    os.remove(os.path.join(directory, f"model_{step:06d}.pt"))  # keep the disk from filling up over the trials
    return save, load


for trial in range(args.trials):
    plain_save, plain_load = save_and_load(2 * trial, records=False)
    checked_save, checked_load = save_and_load(2 * trial + 1, records=True)
    path = os.path.join(directory, "probe.pt")
    torch.save(state, path)
    hash_only = seconds(lambda: file_record(path))
    size = os.path.getsize(path)
    os.remove(path)
    print(f"trial {trial}: {size / 1e6:.0f} MB | save {plain_save:.2f}s -> {checked_save:.2f}s with records | "
          f"load {plain_load:.2f}s -> {checked_load:.2f}s with records | sha256 alone {hash_only:.2f}s "
          f"({size / hash_only / 1e9:.2f} GB/s)", flush=True)
shutil.rmtree(directory)
