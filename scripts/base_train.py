"""
Pretrain the base model. One dial, --depth, sets the size; the horizon defaults to Chinchilla (20 tokens per parameter).

    python -m scripts.base_train --depth 4 --max-seq-len 512 ...                 # CPU / MPS / one GPU
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth 20  # one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m scripts.base_train -- --depth 20                                      # several nodes

Distributed training needs no DDP wrapper: the optimizers (nanochat/optim.py) reduce-scatter the
gradients themselves, each rank updates its shard, and all-gather the result.
"""
import argparse
import dataclasses
import os

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import find_last_step, load_checkpoint, save_checkpoint
from nanochat.common import (COMPUTE_DTYPES, autocast_context, compute_cleanup, compute_init, get_base_dir,
                             get_compute_dtype, get_wandb, print0)
from nanochat.dataloader import PretrainLoader
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import (StepTimer, format_duration, get_grad_accum_steps, get_lr_multiplier,
                               get_muon_momentum, get_peak_flops, is_due, set_learning_rates,
                               set_muon_momentum, throughput_stats)

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:", "My favorite color is"]

parser = argparse.ArgumentParser(description="Pretrain the base GPT")
parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' = no wandb)")
parser.add_argument("--device-type", type=str, default="", help="cuda|mps|cpu (empty = autodetect)")
parser.add_argument("--dtype", type=str, default="auto", choices=COMPUTE_DTYPES,
                    help="matmul dtype (weights stay fp32); auto = bf16 on CUDA and on CPUs with AMX, else fp32")
# model
parser.add_argument("--depth", type=int, default=20, help="number of layers; width = depth*64 rounded up to the 128 head dim")
parser.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for GQA (default: as many as query heads)")
parser.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
parser.add_argument("--x0-mixing", type=int, default=0, choices=[0, 1],
                    help="1 = blocks also see the token embedding through learned per-layer gains (A/B: no gain at depth 4)")
parser.add_argument("--value-embeds", type=int, default=1, choices=[0, 1],
                    help="1 = every other layer adds a token embedding to its attention values (A/B: -0.06 val bpb at depth 4)")
# horizon: the first of these that is > 0 wins
parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = derive from the flags below)")
parser.add_argument("--target-flops", type=float, default=-1.0, help="train for this many FLOPs (-1 = off)")
parser.add_argument("--target-param-data-ratio", type=float, default=20.0, help="tokens per parameter (Chinchilla = 20)")
# batch
parser.add_argument("--device-batch-size", type=int, default=32, help="sequences per rank per micro-step (lower it if out of memory)")
parser.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step, over all ranks and micro-steps")
# optimization
parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding (at width 768)")
parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of the output head (at width 768)")
parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the block matrices")
parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
parser.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of the steps spent warming the lr up")
parser.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of the steps spent decaying the lr at the end")
parser.add_argument("--final-lr-frac", type=float, default=0.0, help="lr at the very end, as a fraction of the peak")
# evaluation, sampling, checkpoints (-1 switches a periodic action off; the final eval and save always happen)
parser.add_argument("--eval-every", type=int, default=250, help="evaluate val bpb every N steps (-1 = only at the end)")
parser.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation")
parser.add_argument("--sample-every", type=int, default=2000, help="print greedy samples every N steps (-1 = only at the end)")
parser.add_argument("--save-every", type=int, default=-1, help="save a checkpoint every N steps (-1 = only at the end)")
parser.add_argument("--resume-from-step", type=int, default=None, help="resume from this saved step (-1 = the latest)")
parser.add_argument("--resume", action="store_true", help="resume from the latest saved step (same as --resume-from-step -1)")
parser.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name (default: d<depth>)")
args = parser.parse_args()
if args.resume and args.resume_from_step is None:
    args.resume_from_step = -1
for name in ("depth", "max_seq_len", "device_batch_size", "total_batch_size", "eval_tokens"):
    if getattr(args, name) <= 0:
        parser.error(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
user_config = dict(vars(args))

# -----------------------------------------------------------------------------
# compute, tokenizer, model

is_distributed, rank, local_rank, world_size, device = compute_init(args.device_type or None)
master_process = rank == 0
compute_dtype = get_compute_dtype(device, args.dtype)
autocast_ctx = autocast_context(device, compute_dtype)
print0(f"compute dtype: {str(compute_dtype).removeprefix('torch.')} (fp32 master weights)")
wandb_run = get_wandb(args.run, project="nanochat", config=user_config, master_process=master_process)

tokenizer = get_tokenizer()
token_bytes = get_token_bytes(device=device)
vocab_size = tokenizer.get_vocab_size()

try:
    model_config = dataclasses.replace(model_config_from_depth(args.depth, vocab_size, args.max_seq_len, args.n_kv_head),
                                       x0_mixing=bool(args.x0_mixing), value_embeds=bool(args.value_embeds))
except ValueError as e:
    parser.error(str(e))
with torch.device("meta"):
    model = GPT(model_config)  # shapes only; memory is allocated once, on the right device
model.to_empty(device=device)
model.init_weights()
orig_model = model  # saving, sampling and evaluating use the uncompiled module
num_params = model.num_params()
# the Chinchilla horizon counts the parameters of the plain model: value embeddings are extra lookup tables
# (hundreds of millions of entries at depth 20) that must not stretch the token budget they were A/B'd at
num_scaling_params = num_params - sum(p.numel() for p in model.value_embeds.parameters())
flops_per_token = model.estimate_flops()
print0(f"model: {dataclasses.asdict(model_config)}")
print0(f"parameters: {num_params:,} ({num_scaling_params:,} without value embeddings) | FLOPs per token: {flops_per_token:e}")

# horizon
tokens_per_step = args.total_batch_size
if args.num_iterations > 0:
    num_iterations = args.num_iterations
elif args.target_flops > 0:
    num_iterations = round(args.target_flops / (flops_per_token * tokens_per_step))
elif args.target_param_data_ratio > 0:
    num_iterations = int(args.target_param_data_ratio * num_scaling_params) // tokens_per_step
else:
    parser.error("set one of --num-iterations, --target-flops, --target-param-data-ratio to a positive value")
if num_iterations < 1:
    parser.error(f"the horizon works out to {num_iterations} steps of {tokens_per_step:,} tokens; raise it or lower --total-batch-size")
try:
    grad_accum_steps = get_grad_accum_steps(args.total_batch_size, args.device_batch_size, args.max_seq_len, world_size)
except ValueError as e:
    parser.error(str(e))
eval_steps = args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size)
if eval_steps < 1:
    parser.error(f"--eval-tokens {args.eval_tokens} is less than one batch over all ranks "
                 f"({args.device_batch_size * args.max_seq_len * world_size} tokens); raise it")
print0(f"steps: {num_iterations:,} | tokens per step: {tokens_per_step:,} | grad accumulation: {grad_accum_steps} | "
       f"total tokens: {num_iterations * tokens_per_step:,} | tokens per parameter: {num_iterations * tokens_per_step / num_scaling_params:.1f}")

optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                    matrix_lr=args.matrix_lr, weight_decay=args.weight_decay, compute_dtype=compute_dtype)
adamw, muon = optimizers

# -----------------------------------------------------------------------------
# resume

model_tag = args.model_tag or f"d{args.depth}"
checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
start_step, loader_state, meta = 0, None, {}
if args.resume_from_step is not None:
    try:
        resume_step = find_last_step(checkpoint_dir) if args.resume_from_step == -1 else args.resume_from_step
        model_data, optimizer_data, meta = load_checkpoint(checkpoint_dir, resume_step, device, load_optimizer=True, rank=rank)
    except FileNotFoundError as e:
        parser.error(f"cannot resume: {e}")
    if meta["model_config"] != dataclasses.asdict(model_config):
        parser.error(f"cannot resume: the checkpoint's model {meta['model_config']} differs from this one "
                     f"{dataclasses.asdict(model_config)}; use the same --depth/--max-seq-len/--n-kv-head/--x0-mixing/--value-embeds and tokenizer")
    model.load_state_dict(model_data, strict=True)
    for opt, state in zip(optimizers, optimizer_data["optimizers"]):
        opt.load_state_dict(state)
    loader_state = optimizer_data["train_loader"]
    torch.set_rng_state(optimizer_data["rng"]["cpu"])
    if device.type == "cuda" and optimizer_data["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(optimizer_data["rng"]["cuda"])
    start_step = meta["step"]
    del model_data, optimizer_data
    print0(f"resumed from step {start_step} of {checkpoint_dir}")

if device.type == "cuda":
    model = torch.compile(model, dynamic=False)

train_loader = PretrainLoader(tokenizer, args.device_batch_size, args.max_seq_len, "train", device=device, resume_state=loader_state)


def evaluate_val_bpb():
    model.eval()
    val_loader = PretrainLoader(tokenizer, args.device_batch_size, args.max_seq_len, "val", device=device)
    with autocast_ctx:
        bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
    model.train()
    return bpb


def print_samples():
    orig_model.eval()
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        with autocast_ctx:
            completion = list(orig_model.generate(tokens, max_tokens=16, temperature=0))
        print0(f"  {prompt!r} -> {tokenizer.decode(completion)!r}")
    orig_model.train()


def save(step):
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    optimizer_data = {"optimizers": [opt.state_dict() for opt in optimizers], "train_loader": train_loader.state_dict(), "rng": rng}
    meta_data = {
        "step": step, "model_config": dataclasses.asdict(model_config), "user_config": user_config,
        "world_size": world_size, "device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
        "val_bpb": val_bpb, "min_val_bpb": min_val_bpb, "smooth_train_loss": smooth_train_loss,
        "total_training_time": timer.elapsed + previous_training_time,
    }
    save_checkpoint(checkpoint_dir, step, orig_model.state_dict(), optimizer_data, meta_data, rank=rank)
    if is_distributed:
        dist.barrier()  # nobody trains on while another rank's shard is still being written


# -----------------------------------------------------------------------------
# the loop

peak_flops = get_peak_flops(device)
timer = StepTimer(device)
previous_training_time = meta.get("total_training_time", 0.0)
val_bpb, min_val_bpb = meta.get("val_bpb"), meta.get("min_val_bpb", float("inf"))
smooth_train_loss = meta.get("smooth_train_loss", 0.0)  # EMA of the training loss, for readable logs
ema_beta = 0.9
initial_val_bpb = None
mfu_sum, mfu_count = 0.0, 0
step = start_step
for step in range(start_step, num_iterations + 1):
    last_step = step == num_iterations

    if is_due(step, args.eval_every, last_step):
        val_bpb = evaluate_val_bpb()
        min_val_bpb = min(min_val_bpb, val_bpb)
        initial_val_bpb = val_bpb if initial_val_bpb is None else initial_val_bpb
        print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
        wandb_run.log({"step": step, "val/bpb": val_bpb})

    if master_process and is_due(step, args.sample_every, last_step):
        print_samples()

    if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
        save(step)

    if last_step:
        break

    with timer:
        train_loss = torch.zeros((), device=device)
        for micro_step in range(grad_accum_steps):
            inputs, targets = next(train_loader)
            with autocast_ctx:
                loss = model(inputs, targets)
            loss = loss / grad_accum_steps
            train_loss += loss.detach()
            loss.backward()
        lr_multiplier = get_lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_learning_rates(optimizers, lr_multiplier)
        set_muon_momentum(muon, get_muon_momentum(step))
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if is_distributed:
            dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)  # log the loss of the whole batch, not rank 0's share
            train_loss = train_loss / world_size
        train_loss = train_loss.item()  # also waits for the step to finish, so the timing is honest

    smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss
    debiased_loss = smooth_train_loss / (1 - ema_beta ** (step + 1))
    tok_per_sec, mfu = throughput_stats(tokens_per_step, timer.last, flops_per_token, peak_flops, world_size)
    if mfu is not None and timer.steps_seen > timer.skip_first:
        mfu_sum, mfu_count = mfu_sum + mfu, mfu_count + 1
    mfu_text = f"{mfu:.1f}%" if mfu is not None else "n/a"
    print0(f"step {step + 1:05d}/{num_iterations:05d} ({100 * (step + 1) / num_iterations:.1f}%) | loss {train_loss:.6f} "
           f"(smooth {debiased_loss:.4f}) | lrm {lr_multiplier:.2f} | dt {timer.last * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | "
           f"mfu {mfu_text} | elapsed {format_duration(previous_training_time + timer.elapsed)} | eta {format_duration(timer.eta(num_iterations - step - 1))}")
    wandb_run.log({"step": step + 1, "train/loss": train_loss, "train/lrm": lr_multiplier, "train/tok_per_sec": tok_per_sec,
                   "train/mfu": mfu if mfu is not None else 0.0})

# -----------------------------------------------------------------------------
# wrap up

total_time = timer.elapsed + previous_training_time
steady_tok_per_sec = (tokens_per_step * timer.steady_steps / timer.steady_time) if timer.steady_steps else float("nan")
print0(f"done: val bpb {val_bpb:.4f} (min {min_val_bpb:.4f}) | training time {format_duration(total_time)}")
get_report().log(section="Base model training", data=[
    user_config,
    {
        "Depth": args.depth,
        "Number of parameters": num_params,
        "FLOPs per token": f"{flops_per_token:e}",
        "Calculated number of iterations": num_iterations,
        "Number of training tokens": num_iterations * tokens_per_step,
        "Tokens : params ratio": num_iterations * tokens_per_step / num_scaling_params,
        "DDP world size": world_size,
        "Total training FLOPs": f"{flops_per_token * num_iterations * tokens_per_step:e}",
        "Initial val bpb": initial_val_bpb if initial_val_bpb is not None else "n/a",
        "Final val bpb": val_bpb,
        "Minimum val bpb": min_val_bpb,
        "Tokens per second": steady_tok_per_sec,
        "MFU %": f"{mfu_sum / mfu_count:.2f}%" if mfu_count else "n/a",
        "Total training time": format_duration(total_time),
        "Peak memory (MiB)": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else "n/a",
    },
])
wandb_run.finish()
compute_cleanup()
