"""
Training-loop mechanics shared by base_train (and later mid_train, chat_sft, chat_rl): plain functions.
"""
import time

import torch

# dense bf16 tensor-core peak FLOP/s by GPU name (substring match, most specific first); used for MFU
GPU_BF16_PEAK_FLOPS = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def get_peak_flops(device):
    """bf16 peak of the device, or None when unknown (CPU, MPS, an unlisted GPU): MFU is then reported as n/a."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_BF16_PEAK_FLOPS:
        if key in name:
            return flops
    return None


def get_grad_accum_steps(total_batch_size, device_batch_size, seq_len, world_size):
    """Micro-steps per optimizer step so that one step sees total_batch_size tokens; errors name the numbers to change."""
    tokens_per_micro_step = device_batch_size * seq_len * world_size
    if total_batch_size % tokens_per_micro_step != 0:
        raise ValueError(
            f"--total-batch-size {total_batch_size} is not a multiple of --device-batch-size {device_batch_size} "
            f"x --max-seq-len {seq_len} x world size {world_size} = {tokens_per_micro_step} tokens; "
            f"set --total-batch-size to a multiple of {tokens_per_micro_step} "
            f"(e.g. {max(1, round(total_batch_size / tokens_per_micro_step)) * tokens_per_micro_step}) or change the others")
    return total_batch_size // tokens_per_micro_step


def get_lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup, flat, then linear warmdown to final_lr_frac (trapezoid schedule)."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def get_muon_momentum(step, warmup_steps=300, start=0.85, end=0.95):
    """Muon's momentum ramps up over the first steps: lower momentum is steadier while the weights move fast."""
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


def set_learning_rates(optimizers, lr_multiplier):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier


def set_muon_momentum(muon, momentum):
    for group in muon.param_groups:
        group["momentum"] = momentum


def is_due(step, every, last_step):
    """Periodic actions run every `every` steps (never when every <= 0, i.e. -1 = off) and always at the last step."""
    return last_step or (every > 0 and step % every == 0)


def format_duration(seconds):
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def throughput_stats(tokens, seconds, flops_per_token, peak_flops, world_size):
    """-> (tokens per second over all ranks, MFU in percent or None)."""
    tok_per_sec = tokens / seconds
    if peak_flops is None:
        return tok_per_sec, None
    mfu = 100 * flops_per_token * tok_per_sec / (peak_flops * world_size)
    return tok_per_sec, mfu


class StepTimer:
    """Wall time of the training steps only (evals and saves are left out), with an ETA that ignores the first, compile-heavy steps."""

    def __init__(self, device, skip_first=5):
        self.device, self.skip_first = device, skip_first
        self.elapsed, self.last, self.steps_seen = 0.0, 0.0, 0
        self.steady_time, self.steady_steps = 0.0, 0

    def __enter__(self):
        self._synchronize()
        self.start = time.time()
        return self

    def __exit__(self, *exc):
        self._synchronize()
        self.last = time.time() - self.start
        self.elapsed += self.last
        self.steps_seen += 1
        if self.steps_seen > self.skip_first:
            self.steady_time += self.last
            self.steady_steps += 1

    def _synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def eta(self, steps_left):
        mean = self.steady_time / self.steady_steps if self.steady_steps else self.last
        return steps_left * mean
