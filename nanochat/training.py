"""
Training-loop mechanics shared by base_train, mid_train, chat_sft and chat_rl: plain functions, so each
script still reads top to bottom like a recipe while the step, the logging and the resume live once.

The one idea worth reading twice is train_step's loss normalisation: the loss of a step is the mean over
every target token the step saw, on every rank, whatever the micro-batch split (see its docstring).
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.artifacts import DamagedArtifactError
from nanochat.checkpoint_manager import check_state_dict, find_last_step, list_whole_steps, load_checkpoint, save_checkpoint
from nanochat.common import (COMPUTE_DTYPES, autocast_context, compute_init, format_duration, get_compute_dtype, get_dist_info,
                             get_wandb, print0)
from nanochat.report import curves_dir

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


# -----------------------------------------------------------------------------
# what every training stage (base, mid, SFT, RL) shares: flags, setup, the step, logging, resume


def add_training_args(parser):
    """The flags every training stage takes; a script changes their defaults with parser.set_defaults()."""
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' = no wandb)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|mps|cpu (empty = autodetect)")
    parser.add_argument("--dtype", type=str, default="auto", choices=COMPUTE_DTYPES,
                        help="matmul dtype (weights stay fp32); auto = bf16 on CUDA and on CPUs with AMX, else fp32")
    parser.add_argument("--compile", type=str, default="auto", choices=["auto", "0", "1"],
                        help="torch.compile the model; auto = on CUDA and in bf16 on CPU, where it wins (dev/BENCHMARKS.md)")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name, e.g. d20")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
    parser.add_argument("--device-batch-size", type=int, default=32, help="rows per rank per micro-step (lower it if out of memory)")
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = derived, see the script's help)")
    parser.add_argument("--eval-every", type=int, default=250, help="evaluate every N steps (-1 = only at the end)")
    parser.add_argument("--save-every", type=int, default=-1, help="save a checkpoint every N steps (-1 = only at the end)")
    parser.add_argument("--resume-from-step", type=int, default=None, help="resume from this saved step of this stage (-1 = the latest)")
    parser.add_argument("--resume", action="store_true", help="resume from the latest saved step (same as --resume-from-step -1)")
    parser.add_argument("--resume-if-saved", action="store_true",
                        help="resume from the latest saved step when this stage has one, else start fresh (what speedrun.sh passes)")


def add_optimizer_args(parser):
    """The learning rates and weight decay of the Muon + AdamW pair (GPT.setup_optimizers)."""
    parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding (at width 768)")
    parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of the output head (at width 768)")
    parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the block matrices")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")


def setup_optimizers(model, args, compute, lr_scale=1.0):
    """Muon + AdamW from the optimizer flags; lr_scale multiplies every lr (finetuning starts lower)."""
    return model.setup_optimizers(unembedding_lr=args.unembedding_lr * lr_scale, embedding_lr=args.embedding_lr * lr_scale,
                                  matrix_lr=args.matrix_lr * lr_scale, weight_decay=args.weight_decay, compute_dtype=compute.dtype)


def check_training_args(parser, args, positive=("max_seq_len", "device_batch_size")):
    """Shared argument checks: parser.error names the flag to change."""
    if args.resume and args.resume_from_step is None:
        args.resume_from_step = -1
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")


@dataclass
class Compute:
    """Where and how a stage runs: one per process."""
    is_distributed: bool
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype  # matmul dtype under autocast; weights stay fp32
    autocast: object  # context manager for forward passes
    wandb: object  # a wandb run, or DummyWandb

    @property
    def master_process(self):
        return self.rank == 0

    def barrier(self):
        if self.is_distributed:
            dist.barrier()


def init_compute(args, project="nanochat"):
    """Device, process group, compute dtype and wandb from the shared flags."""
    is_distributed, rank, _, world_size, device = compute_init(args.device_type or None)
    dtype = get_compute_dtype(device, args.dtype)
    print0(f"device: {device} x {world_size} | compute dtype: {str(dtype).removeprefix('torch.')} (fp32 master weights)")
    wandb_run = get_wandb(args.run, project=project, config=dict(vars(args)), master_process=rank == 0)
    return Compute(is_distributed, rank, world_size, device, dtype, autocast_context(device, dtype), wandb_run)


def maybe_compile(model, compute, setting="auto", dynamic=False):
    """
    torch.compile where it pays for itself. auto: on CUDA (measured on an H200: 52-54% MFU at depth 12-20,
    ~50-70 s of compiling) and on CPUs computing in bf16 (AMX: ~36% faster steps at depth 4); not on fp32
    CPUs (measured on a 2-core EPYC: 3.0-3.3 vs 3.1-3.5 s per CPU-profile step, a wash once the compile
    is paid), and never for dynamic shapes (SFT's changing row lengths: on the H200 the dynamic compile
    had not finished after ~3 minutes at depth 20, longer than eager SFT takes). setting "1" forces it on.
    """
    use = not dynamic and (compute.device.type == "cuda" or (compute.device.type == "cpu" and compute.dtype == torch.bfloat16))
    if setting != "auto":
        use = setting == "1"
    if not use:
        return model
    print0(f"compiling the model (torch.compile, dynamic={dynamic}); the first steps are slower")
    return torch.compile(model, dynamic=dynamic)


def train_step(model, optimizers, batches, grad_accum_steps, autocast_ctx, lr_multiplier, muon_momentum=None):
    """
    One optimizer step: grad_accum_steps micro-batches of (inputs, targets) from `batches`, then every optimizer.
    A micro-batch may carry a third tensor of per-target weights (RL's advantages): its loss is then sum(weight * nll).
    The loss is the mean over ALL target tokens of the step (targets of -1 are ignored), across
    micro-batches and ranks: each micro-batch backpropagates its loss *sum*, and the gradients are scaled
    by world_size / (target tokens of the whole step) at the end (the optimizers average over ranks).
    Averaging per micro-batch instead would weight a token in a short micro-batch more than one in a long
    one, so the batch size, accumulation and world size would change the gradient of masked (SFT) data.
    Returns (the step's mean loss over all ranks as a 0-d tensor: .item() waits for the step to finish,
    the number of token positions processed over all ranks, padding included: what tok/s and MFU count).
    """
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    num_tokens = torch.zeros((), device=device, dtype=torch.float32)
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    positions = 0
    for _ in range(grad_accum_steps):
        inputs, targets, *token_weights = next(batches)
        with autocast_ctx:
            if token_weights:  # RL: each target's loss is weighted by its advantage (nanochat/rl.py)
                loss = (model(inputs, targets, loss_reduction="none").float() * token_weights[0]).sum()
            else:
                loss = model(inputs, targets, loss_reduction="sum")
        loss.backward()
        loss_sum += loss.detach().float()
        num_tokens += (targets >= 0).sum()
        positions += inputs.numel() * world_size
    if world_size > 1:
        totals = torch.stack([loss_sum, num_tokens])
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        loss_sum, num_tokens = totals[0], totals[1]
    num_tokens = num_tokens.clamp(min=1)  # a step whose targets are all masked changes nothing
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, world_size / num_tokens)  # a tensor factor: no wait for the GPU here
    set_learning_rates(optimizers, lr_multiplier)
    if muon_momentum is not None:
        set_muon_momentum(optimizers[1], muon_momentum)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum / num_tokens, positions


def run_training_loop(start_step, num_iterations, step_fn, logger, evaluate, save, eval_every, save_every, lr_multiplier,
                      extra_log=None):
    """
    The loop every gradient-based stage runs: evaluate when due (and at the end), save when due (and at the
    end), then one step. step_fn(step, lr_multiplier) -> (loss tensor, tokens) trains one step (train_step);
    evaluate(step) and save(step) are the stage's own; lr_multiplier(step) its schedule; extra_log() adds
    fields to the step's log line. Stops after saving step num_iterations.
    """
    for step in range(start_step, num_iterations + 1):
        last_step = step == num_iterations
        if is_due(step, eval_every, last_step):
            evaluate(step)
        if last_step or (save_every > 0 and step > start_step and step % save_every == 0):
            save(step)
        if last_step:
            break
        multiplier = lr_multiplier(step)
        with logger.timer:
            loss, tokens = step_fn(step, multiplier)
            loss = loss.item()  # waits for the step to finish, so the timing is honest
        logger.log(step, loss, tokens, multiplier, extra_log() if extra_log else None)


def record_curve_point(stage, step, **values):
    """
    Append {"step": step, **values} as one JSON line to <base dir>/report/curves/<stage>.jsonl (rank 0 only),
    for the report's training-curve plots. An append, not an atomic artifact: a crash loses at most the line
    being written, and a resumed run simply records its steps again (the report keeps each step's last value).
    Names are stored with underscores ("val bpb" -> "val_bpb"), so a script can pass its metrics dict as it is.
    """
    if get_dist_info()[1] != 0:
        return
    point = {"step": step, **{name.replace(" ", "_"): float(value) for name, value in values.items()}}
    os.makedirs(curves_dir(), exist_ok=True)
    with open(os.path.join(curves_dir(), f"{stage}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(point) + "\n")


class StepLogger:
    """
    The per-step log line (loss, smoothed loss, lr, step time, tok/s, MFU, elapsed, ETA), wandb logging,
    and the running figures a report needs. Times cover training steps only (evals and saves are left out).
    """

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
        self.mfu_sum, self.mfu_count, self.steady_tokens = 0.0, 0, 0

    @property
    def total_time(self):
        return self.previous_time + self.timer.elapsed

    def log(self, step, loss, tokens, lr_multiplier, extra=None):
        """step: the step just finished (0-based); tokens: the tokens it trained on, over all ranks."""
        timer = self.timer
        self.smooth_loss = self.ema_beta * self.smooth_loss + (1 - self.ema_beta) * loss
        debiased = self.smooth_loss / (1 - self.ema_beta ** (step + 1))
        tok_per_sec, mfu = throughput_stats(tokens, timer.last, self.flops_per_token, self.peak_flops, self.compute.world_size)
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
        self.compute.wandb.log({"step": step + 1, "train/loss": loss, "train/lrm": lr_multiplier, "train/tok_per_sec": tok_per_sec,
                                "train/mfu": mfu if mfu is not None else 0.0})

    def summary(self):
        """Figures for the report section."""
        steady = self.steady_tokens / self.timer.steady_time if self.timer.steady_steps else float("nan")
        device = self.compute.device
        return {
            "Tokens per second": steady,
            "MFU %": f"{self.mfu_sum / self.mfu_count:.2f}%" if self.mfu_count else "n/a",
            "Total training time": format_duration(self.total_time),
            "Peak memory (MiB)": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else "n/a",
        }


def save_training_state(checkpoint_dir, step, model, optimizers, loader, meta, compute):
    """
    Everything an exact resume needs: weights, every rank's optimizer shard, the loader's position, the RNG.
    loader is None for a stage whose data position follows from the step alone (RL).
    """
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(compute.device) if compute.device.type == "cuda" else None}
    optimizer_data = {"optimizers": [opt.state_dict() for opt in optimizers],
                      "train_loader": loader.state_dict() if loader is not None else None, "rng": rng}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), optimizer_data, meta, rank=compute.rank)
    compute.barrier()  # nobody trains on while another rank's shard is still being written


def load_source_model(parser, source, args, compute):
    """
    The previous stage's model for finetuning (mid from base, SFT from mid, RL from SFT), from --model-tag and
    --step, and the row length: --max-seq-len, or the model's own context when it is -1.
    Returns (model, tokenizer, the source checkpoint's meta, row length).
    """
    from nanochat.checkpoint_manager import load_model

    try:
        model, tokenizer, meta = load_model(source, compute.device, phase="train", model_tag=args.model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"cannot load the {source} model: {e}")
    if args.max_seq_len != -1 and args.max_seq_len <= 0:
        parser.error(f"--max-seq-len must be positive, or -1 for the model's own context (got {args.max_seq_len})")
    seq_len = model.config.sequence_len if args.max_seq_len == -1 else args.max_seq_len
    print0(f"{source} model {meta['model_tag']} step {meta['step']}: {model.num_params():,} parameters | rows of up to {seq_len} tokens")
    return model, tokenizer, meta, seq_len


def resume_if_asked(parser, args, checkpoint_dir, model, optimizers, compute, hint=""):
    """(start step, loader state, meta) from --resume-from-step when it was given, else a fresh start (0, None, {})."""
    if args.resume_from_step is None and getattr(args, "resume_if_saved", False):
        # an interrupted speedrun picks up where it stopped; a stage never run before starts fresh
        whole_steps = list_whole_steps(checkpoint_dir)  # a save cut short by the interruption is passed over
        if whole_steps:
            args.resume_from_step = whole_steps[-1]
        else:
            print0(f"no saved step in {checkpoint_dir}: starting fresh")
    if args.resume_from_step is None:
        return 0, None, {}
    try:
        return resume_training_state(checkpoint_dir, args.resume_from_step, model, optimizers, compute)
    except (DamagedArtifactError, FileNotFoundError) as e:  # complete as they are: the hint is for a mismatched model
        parser.error(f"cannot resume: {e}")
    except ValueError as e:
        parser.error(f"cannot resume: {e}{hint}")


def resume_training_state(checkpoint_dir, resume_from_step, model, optimizers, compute):
    """
    Load weights, optimizer shards and RNG saved by save_training_state into model/optimizers.
    Returns (step, loader_state, meta). Raises ValueError/FileNotFoundError saying what to change.
    """
    step = find_last_step(checkpoint_dir) if resume_from_step == -1 else resume_from_step
    model_data, optimizer_data, meta = load_checkpoint(checkpoint_dir, step, compute.device, load_optimizer=True, rank=compute.rank,
                                                       required_meta_keys=("model_config",))
    if meta["model_config"] != dataclasses.asdict(model.config):
        raise ValueError(f"the checkpoint's model {meta['model_config']} differs from this one {dataclasses.asdict(model.config)}; "
                         f"resume with the same model flags and tokenizer")
    if meta.get("world_size", compute.world_size) != compute.world_size:
        raise ValueError(f"step {step} was saved by {meta['world_size']} ranks, this run has {compute.world_size}; "
                         f"resume with the same number of ranks")
    model.load_state_dict(check_state_dict(model, model_data, f"step {step}'s model file"), strict=True)
    shard = f"the optimizer shard of step {step} for rank {compute.rank}"
    try:  # a shard that parses but holds something else: one message, not a traceback from inside torch.optim
        if len(optimizer_data["optimizers"]) != len(optimizers):
            raise ValueError(f"{len(optimizer_data['optimizers'])} optimizers, this run has {len(optimizers)}")
        for opt, state in zip(optimizers, optimizer_data["optimizers"]):
            opt.load_state_dict(state)
        torch.set_rng_state(optimizer_data["rng"]["cpu"])
        if compute.device.type == "cuda" and optimizer_data["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(optimizer_data["rng"]["cuda"], compute.device)
        loader_state = optimizer_data["train_loader"]
        if loader_state is not None and not isinstance(loader_state, dict):
            raise ValueError(f"the loader state is a {type(loader_state).__name__}, not a dict")
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ValueError(f"{shard} does not hold this run's optimizer state ({type(e).__name__}: {e}); "
                         f"resume from another step or start the stage over") from None
    print0(f"resumed from step {step} of {checkpoint_dir}")
    return step, loader_state, meta
