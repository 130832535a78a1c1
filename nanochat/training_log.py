"""
What a training stage prints as it goes: one line per step (loss, smoothed loss, lr multiplier, step time,
tok/s, MFU, elapsed, ETA), one per evaluation, the same figures to wandb and the report's curves, and at
the end the summary for the report section.

MFU (model FLOPs utilisation, PaLM, Chowdhery et al. 2022) is the FLOPs the model needs per token times
the tokens per second, over the hardware's peak: ~6 N FLOPs per token for N parameters (forward 2N,
backward 4N) plus attention (GPT.estimate_flops). It says how much of the GPU the code uses whatever the
model size; the peak is the dense bf16 tensor-core figure of the GPU, and MFU is n/a where it is unknown.
For scale (dev/BENCHMARKS.md): one H200 training depth 20 ran 165,296 tok/s, 54.2% MFU of its 989 TFLOP/s.

Times cover the training steps only (evals and saves are left out), and the ETA ignores the first steps,
where torch.compile and the allocator warm up. A resumed run carries on the time and the smoothed loss of
the run it resumed (state_dict goes into the checkpoint's meta).
"""
import time

import torch

from nanochat.common import format_duration, print0
from nanochat.curves import record_curve_point

# Dense bf16 tensor-core peak FLOP/s by GPU name, used for MFU. Vendors also quote twice these figures "with
# sparsity" (2:4 structured sparsity, which dense training never uses): those would halve every MFU.
# Substring match, first hit wins, so the more specific name comes first: "H100 PCIe" before "H100",
# "GH200" before "H200", "L40S" before "L40" before "L4", "A100" before "A10".
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
    # a CPU's peak depends on its cores, clock and vector units (AMX or not), which no name lookup can give
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_BF16_PEAK_FLOPS:
        if key in name:
            return flops
    return None


def throughput_stats(tokens, seconds, flops_per_token, peak_flops, world_size):
    """-> (tokens per second over all ranks, MFU in percent or None)."""
    tok_per_sec = tokens / seconds
    if peak_flops is None:
        return tok_per_sec, None
    # achieved FLOP/s (the model's FLOPs per token x tokens per second) over the peak of all the GPUs together
    mfu = 100 * flops_per_token * tok_per_sec / (peak_flops * world_size)
    return tok_per_sec, mfu


class StepTimer:
    """`with timer:` around a step. Waits for the device at both ends, so the time is the step's, not its launch's."""

    def __init__(self, device, skip_first=5):
        # the first skip_first steps count in the elapsed time but not in the steady-state mean the ETA uses:
        # compiling and the allocator's first growth make them slower (on an H200, 47-69 s of compile + warm-up)
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
        # GPU work is queued asynchronously: without waiting, time.time() would measure how fast Python
        # launches kernels, not how long they take
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def eta(self, steps_left):
        """Seconds for steps_left more steps at the steady-state mean (the last step's time until there is one)."""
        mean = self.steady_time / self.steady_steps if self.steady_steps else self.last
        return steps_left * mean


class StepLogger:
    """The step and evaluation lines of a stage, its wandb logging and curve, and the running figures its report needs."""

    def __init__(self, compute, num_iterations, flops_per_token, resumed_meta=None, ema_beta=0.9, stage=None):
        """
        resumed_meta: the meta of the checkpoint a run resumed from, whose time and smoothed loss carry on.
        stage: the name of the report's training curve ("base", "mid", "sft", "rl"); None records none.
        """
        self.compute, self.num_iterations, self.flops_per_token = compute, num_iterations, flops_per_token
        self.stage = stage
        self.peak_flops = get_peak_flops(compute.device)
        self.timer = StepTimer(compute.device)
        resumed_meta = resumed_meta or {}
        self.previous_time = resumed_meta.get("total_training_time", 0.0)  # training time of the run before a resume
        self.smooth_loss = resumed_meta.get("smooth_train_loss", 0.0)  # EMA of the training loss, for readable logs
        self.ema_beta = ema_beta
        # running sums for summary(): the mean MFU and the steady-state tok/s of the whole run
        self.mfu_sum, self.mfu_count, self.steady_tokens = 0.0, 0, 0

    @property
    def total_time(self):
        # training time across resumes: the run before the interruption plus this process's steps
        return self.previous_time + self.timer.elapsed

    def state_dict(self):
        """What a checkpoint's meta keeps so that a resumed run's log carries on (see resumed_meta)."""
        return {"smooth_train_loss": self.smooth_loss, "total_training_time": self.total_time}

    def log(self, step, loss, tokens, lr_multiplier, extra=None):
        """
        step: the step just finished (0-based), timed by `with self.timer`; loss: its loss (a float or a 0-d tensor);
        tokens: the tokens it trained on, over all ranks; extra: {name: text} fields added to the line.
        """
        # float(loss) of a device tensor waits for the step: fine here, the timer already synchronised
        loss, timer = float(loss), self.timer
        # the EMA starts at 0, so early values are pulled towards 0: dividing by 1 - beta^(step+1) removes that bias (as Adam does)
        self.smooth_loss = self.ema_beta * self.smooth_loss + (1 - self.ema_beta) * loss
        debiased = self.smooth_loss / (1 - self.ema_beta ** (step + 1))
        tok_per_sec, mfu = throughput_stats(tokens, timer.last, self.flops_per_token, self.peak_flops, self.compute.world_size)
        # the summary's tok/s and MFU average over the steady steps only, like the ETA
        if timer.steps_seen > timer.skip_first:
            self.steady_tokens += tokens
            if mfu is not None:
                self.mfu_sum, self.mfu_count = self.mfu_sum + mfu, self.mfu_count + 1
        extra_text = "".join(f" | {key} {value}" for key, value in (extra or {}).items())
        print0(f"step {step + 1:05d}/{self.num_iterations:05d} ({100 * (step + 1) / self.num_iterations:.1f}%) | loss {loss:.6f} "
               f"(smooth {debiased:.4f}) | lrm {lr_multiplier:.2f} | dt {timer.last * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | "
               f"mfu {f'{mfu:.1f}%' if mfu is not None else 'n/a'}{extra_text} | elapsed {format_duration(self.total_time)} | "
               f"eta {format_duration(timer.eta(self.num_iterations - step - 1))}")
        if self.stage is not None:
            record_curve_point(self.stage, step + 1, train_loss=loss)  # step + 1: steps done, the count evaluations use
        # wandb gets the raw loss; it draws its own smoothing
        self.compute.wandb.log({"step": step + 1, "train/loss": loss, "train/lrm": lr_multiplier, "train/tok_per_sec": tok_per_sec,
                                "train/mfu": mfu if mfu is not None else 0.0})

    def log_eval(self, step, metrics, note=""):
        """An evaluation after `step` steps, {name: value}: its line, wandb (val/<name>, "val bpb" as val/bpb) and the curve."""
        # wandb keys without spaces: "val bpb" -> "val/bpb", next to train/loss
        print0(f"step {step:05d} | " + " | ".join(f"{name} {value:.4f}" for name, value in metrics.items()) + note)
        self.compute.wandb.log({"step": step, **{f"val/{name.removeprefix('val ')}": value for name, value in metrics.items()}})
        if self.stage is not None:
            record_curve_point(self.stage, step, **metrics)

    def summary(self):
        """Figures for the report section."""
        # nan, not a made-up number, when a run was too short to have steady steps
        steady = self.steady_tokens / self.timer.steady_time if self.timer.steady_steps else float("nan")
        device = self.compute.device
        return {
            "Tokens per second": steady,
            "MFU %": f"{self.mfu_sum / self.mfu_count:.2f}%" if self.mfu_count else "n/a",
            "Total training time": format_duration(self.total_time),
            "Peak memory (MiB)": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else "n/a",
        }
