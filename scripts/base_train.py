"""
Pretrain the base model. One dial, --depth, sets the size; the horizon defaults to Chinchilla (20 tokens per parameter).

    python -m scripts.base_train --depth 4 --max-seq-len 512 ...                 # CPU / MPS / one GPU
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth 20  # one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m scripts.base_train -- --depth 20                                      # several nodes

Distributed training needs no DDP wrapper: the optimizers (nanochat/optim.py) reduce-scatter the
gradients themselves, each rank updates its shard, and all-gather the result.

How long to train: Chinchilla (Hoffmann et al. 2022) fitted loss against model size and tokens and found
that for a fixed compute budget the best model sees ~20 tokens per parameter; fewer and a smaller model
would have done better, more and a bigger one would. So the horizon is not a separate knob: --depth
fixes the parameters, 20 x parameters is the token budget, and the steps are that budget divided by the
tokens per step. --target-flops instead fixes the compute (6 N D FLOPs for N parameters and D tokens).
--time-budget fixes the wall-clock time instead: on a small machine (the CPU profile) the Chinchilla horizon
is out of reach, and a time budget lets a faster CPU train on more tokens rather than finish early. The log
and the report say how many steps and tokens that came to; a rerun on a busier machine trains on fewer.

The learning rate schedule is warmup-stable-decay: flat at the peak, then a linear decay to 0 over the
last 20% of the steps; the loss drops sharply during the decay (Hägele et al. 2024 study this schedule).
"""
import argparse
import dataclasses
import os

import torch

from nanochat.common import compute_cleanup, get_base_dir, print0
from nanochat.dataloader import PretrainLoader
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import (agree_across_ranks, get_grad_accum_steps, get_lr_multiplier, get_muon_momentum, is_due,
                               steps_within_time_budget, train_step, warmdown_started)
from nanochat.training_log import StepLogger
from nanochat.training_setup import (add_optimizer_args, add_training_args, check_training_args, init_compute, prepare_model,
                                     setup_optimizers)
from nanochat.training_state import resume_if_asked, save_training_state

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:", "My favorite color is"]

parser = argparse.ArgumentParser(description="Pretrain the base GPT")
add_training_args(parser)  # --run --device-type --dtype --compile --model-tag --max-seq-len --device-batch-size ...
# model
parser.add_argument("--depth", type=int, default=20, help="number of layers; width = depth*64 rounded up to the 128 head dim")
parser.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for GQA (default: as many as query heads)")
parser.add_argument("--x0-mixing", type=int, default=0, choices=[0, 1],
                    help="1 = blocks also see the token embedding through learned per-layer gains (A/B: no gain at depth 4)")
parser.add_argument("--value-embeds", type=int, default=1, choices=[0, 1],
                    help="1 = every other layer adds a token embedding to its attention values (A/B: -0.06 val bpb at depth 4)")
# horizon: the first of these that is > 0 wins (--num-iterations, then these)
parser.add_argument("--target-flops", type=float, default=-1.0, help="train for this many FLOPs (-1 = off)")
parser.add_argument("--target-param-data-ratio", type=float, default=20.0, help="tokens per parameter (Chinchilla = 20)")
parser.add_argument("--time-budget", type=float, default=-1.0,
                    help="train for this many minutes of training steps (evals and saves not counted), at most the horizon "
                         "above; the steps are set from the measured step time, so a faster machine trains on more tokens (-1 = off)")
# 2^19 = 524,288 tokens per step: 8 GPUs x 32 rows x 2048 tokens in one micro-step, with gradient accumulation
# making up the difference on fewer devices, so the optimisation is the same on 1 GPU or 8, only slower
parser.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step, over all ranks and micro-steps")
# optimization
add_optimizer_args(parser)  # --embedding-lr --unembedding-lr --matrix-lr --weight-decay
parser.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of the steps spent warming the lr up")
parser.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of the steps spent decaying the lr at the end")
parser.add_argument("--final-lr-frac", type=float, default=0.0, help="lr at the very end, as a fraction of the peak")
# evaluation and sampling (-1 switches a periodic action off; the final eval and save always happen)
parser.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation (at most one pass over the val split)")
parser.add_argument("--sample-every", type=int, default=2000, help="print greedy samples at the evaluation of every N-th step (-1 = only at the end)")
args = parser.parse_args()
check_training_args(parser, args, positive=("depth", "max_seq_len", "device_batch_size", "total_batch_size", "eval_tokens"))
user_config = dict(vars(args))

# -----------------------------------------------------------------------------
# compute, tokenizer, model

compute = init_compute(args)
try:
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=compute.device)
except (FileNotFoundError, ValueError) as e:  # not trained yet, or a damaged file: the message says what to run
    parser.error(str(e))
vocab_size = tokenizer.get_vocab_size()

try:
    model_config = dataclasses.replace(model_config_from_depth(args.depth, vocab_size, args.max_seq_len, args.n_kv_head),
                                       x0_mixing=bool(args.x0_mixing), value_embeds=bool(args.value_embeds))
except ValueError as e:
    parser.error(str(e))
with torch.device("meta"):
    model = GPT(model_config)  # shapes only; memory is allocated once, on the right device
model.to_empty(device=compute.device)
model.init_weights()
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
    # Chinchilla: tokens = ratio x parameters, rounded down to whole steps
    num_iterations = int(args.target_param_data_ratio * num_scaling_params) // tokens_per_step
else:
    parser.error("set one of --num-iterations, --target-flops, --target-param-data-ratio to a positive value")
max_iterations = num_iterations  # the cap a --time-budget horizon stays under
if args.time_budget > 0 and args.warmup_ratio > 0:
    parser.error("--time-budget needs --warmup-ratio 0: the warmup's length would depend on a horizon not known yet")
if num_iterations < 1:
    parser.error(f"the horizon works out to {num_iterations} steps of {tokens_per_step:,} tokens; raise it or lower --total-batch-size")
try:
    grad_accum_steps = get_grad_accum_steps(args.total_batch_size, args.device_batch_size, args.max_seq_len, compute.world_size)
except ValueError as e:
    parser.error(str(e))
# the same number of validation tokens whatever the batch layout, so val bpb is comparable across runs
eval_steps = args.eval_tokens // (args.device_batch_size * args.max_seq_len * compute.world_size)
if eval_steps < 1:
    parser.error(f"--eval-tokens {args.eval_tokens} is less than one batch over all ranks "
                 f"({args.device_batch_size * args.max_seq_len * compute.world_size} tokens); raise it")
if args.time_budget > 0:
    print0(f"time budget: {args.time_budget:g} minutes of training steps; the horizon below is a cap until the step time is measured")
    if args.deterministic:
        print0("note: with --time-budget the number of steps follows this machine's speed, so a rerun may train on more or "
               "fewer steps than this one; for the same bits on a rerun give --num-iterations (the horizon this run prints)")
print0(f"steps: {num_iterations:,} | tokens per step: {tokens_per_step:,} | grad accumulation: {grad_accum_steps} | "
       f"total tokens: {num_iterations * tokens_per_step:,} | tokens per parameter: {num_iterations * tokens_per_step / num_scaling_params:.1f}")

optimizers = setup_optimizers(model, args, compute)

# -----------------------------------------------------------------------------
# resume

model_tag = args.model_tag or f"d{args.depth}"
checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
start_step, loader_state, meta = resume_if_asked(parser, args, checkpoint_dir, model, optimizers, compute,
                                                 hint="; use the same --depth/--max-seq-len/--n-kv-head/--x0-mixing/--value-embeds")

if args.time_budget > 0:  # the horizon as far as the interrupted run had set it from its step times
    num_iterations = meta.get("num_iterations", num_iterations)
orig_model = model  # saving and sampling use the module itself; steps and evals run what prepare_model makes of it
model = prepare_model(model, compute, args.compile)
train_loader = PretrainLoader(tokenizer, args.device_batch_size, args.max_seq_len, "train", device=compute.device, resume_state=loader_state)


def evaluate_val_bpb():
    model.eval()
    # at most one pass: a small val split (the embedded sample's) is never counted twice
    val_loader = PretrainLoader(tokenizer, args.device_batch_size, args.max_seq_len, "val", device=compute.device, single_pass=True)
    with compute.autocast:
        bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
    if val_loader.tokens_emitted < eval_steps * args.device_batch_size * args.max_seq_len:
        print0(f"val: the split ran out after {val_loader.tokens_emitted:,} tokens on this rank (one pass; --eval-tokens asked for more)")
    model.train()
    return bpb


def print_samples():
    orig_model.eval()
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        with compute.autocast:
            completion = list(orig_model.generate(tokens, max_tokens=16, temperature=0))
        print0(f"  {prompt!r} -> {tokenizer.decode(completion)!r}")
    orig_model.train()


# -----------------------------------------------------------------------------
# the loop: evaluate and save when due (always at the end), then one optimizer step

logger = StepLogger(compute, num_iterations, flops_per_token, resumed_meta=meta, stage="base")
val_bpb, min_val_bpb = meta.get("val_bpb"), meta.get("min_val_bpb", float("inf"))
initial_val_bpb = meta.get("initial_val_bpb")  # a resumed run reports the first run's step-0 figure, not its own first eval
step = start_step
while True:
    # --time-budget: until the warmdown starts, the horizon follows the measured step time (see steps_within_time_budget)
    timer = logger.timer
    if args.time_budget > 0 and timer.steady_steps >= 3 and not warmdown_started(step, num_iterations, args.warmdown_ratio):
        estimate = steps_within_time_budget(step, logger.total_time, timer.steady_time / timer.steady_steps,
                                            60 * args.time_budget, max_iterations)
        num_iterations = logger.num_iterations = agree_across_ranks(estimate, compute.device)
        if warmdown_started(step + 1, num_iterations, args.warmdown_ratio):
            print0(f"time budget: the warmdown starts; the horizon is fixed at {num_iterations:,} steps "
                   f"({num_iterations * tokens_per_step:,} tokens)")
    last_step = step == num_iterations
    if is_due(step, args.eval_every, last_step):
        val_bpb = evaluate_val_bpb()
        min_val_bpb = min(min_val_bpb, val_bpb)
        initial_val_bpb = val_bpb if initial_val_bpb is None else initial_val_bpb
        logger.log_eval(step, {"val bpb": val_bpb})
        if compute.master_process and is_due(step, args.sample_every, last_step):
            print_samples()
    if last_step or (step > start_step and is_due(step, args.save_every, last_step)):  # the step resumed from is saved already
        save_training_state(checkpoint_dir, step, orig_model, optimizers, train_loader, compute, {
            "user_config": user_config, "device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
            "val_bpb": val_bpb, "min_val_bpb": min_val_bpb, "initial_val_bpb": initial_val_bpb, "num_iterations": num_iterations,
            **logger.state_dict()})
    if last_step:
        break
    lr_multiplier = get_lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    with logger.timer:
        loss, tokens = train_step(model, optimizers, train_loader, grad_accum_steps, compute.autocast, lr_multiplier,
                                  get_muon_momentum(step))
    logger.log(step, loss, tokens, lr_multiplier)
    step += 1

# -----------------------------------------------------------------------------
# wrap up

print0(f"done: val bpb {val_bpb:.4f} (min {min_val_bpb:.4f}) | training time {logger.summary()['Total training time']}")
get_report().log(section="Base model training", data=[
    user_config,
    {
        "Depth": args.depth,
        "Number of parameters": num_params,
        "FLOPs per token": f"{flops_per_token:e}",
        "Calculated number of iterations": num_iterations,
        "Time budget (minutes)": args.time_budget if args.time_budget > 0 else "none",
        "Number of training tokens": num_iterations * tokens_per_step,
        "Tokens : params ratio": num_iterations * tokens_per_step / num_scaling_params,
        "DDP world size": compute.world_size,
        "Total training FLOPs": f"{flops_per_token * num_iterations * tokens_per_step:e}",
        "Initial val bpb": initial_val_bpb if initial_val_bpb is not None else "n/a",
        "Final val bpb": val_bpb,
        "Minimum val bpb": min_val_bpb,
        **logger.summary(),
    },
])
compute.wandb.finish()
compute_cleanup()
