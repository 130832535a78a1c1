"""
Reinforcement learning on GSM8K: the SFT model practises math word problems with its calculator and is
rewarded for right final answers. GRPO-style and strictly on-policy (nanochat/rl.py): each step samples
a group of completions per question, the advantage of each is its reward minus its group's mean, and
one policy-gradient step on the sampled tokens follows.

    python -m scripts.chat_rl                                           # from the latest SFT checkpoint
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run rl
    NANOCHAT_DATA=sample python -m scripts.chat_rl                      # offline: synthetic GSM8K-format arithmetic

Each step logs the mean reward, the share of groups whose rewards were all equal (they teach nothing),
the mean completion length, tool calls per completion and how the step's time splits between sampling
and learning. pass@1 and pass@k on held-out problems every --eval-every steps. Writes chatrl_checkpoints/<tag>/.
"""
import argparse
import dataclasses
import os
import random
import time

import torch

from nanochat.common import compute_cleanup, get_base_dir, print0
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.rl import policy_gradient_batches, sample_group
from nanochat.task_eval import all_reduce_sums, run_generative_eval
from nanochat.training import (StepLogger, add_optimizer_args, add_training_args, check_training_args, get_muon_momentum,
                               init_compute, load_source_model, resume_if_asked, run_training_loop, save_training_state,
                               record_curve_point, setup_optimizers, train_step)
from tasks.arithmetic import Arithmetic
from tasks.common import use_stand_ins
from tasks.gsm8k import GSM8K


def rl_data(stand_ins, stand_in_size, train_file=None, test_file=None):
    """(train task, held-out task, description): GSM8K, or offline the arithmetic problems the SFT stand-ins taught."""
    if train_file or test_file:
        if not (train_file and test_file):
            raise ValueError("--train-file and --test-file go together: pass both")
        return (GSM8K("main", "train", path=train_file), GSM8K("main", "test", path=test_file),
                f"GSM8K-format files: {train_file} to practise, {test_file} to evaluate")
    if not stand_ins:
        return GSM8K("main", "train"), GSM8K("main", "test"), "GSM8K main: train to practise, test to evaluate"
    # Arithmetic's splits never share a question; its train problems are those SFT saw, as GSM8K train is online
    return (Arithmetic("train", size=stand_in_size), Arithmetic("test", size=max(stand_in_size // 10, 100)),
            f"STAND-INS (offline): {stand_in_size} synthetic GSM8K-format arithmetic problems, held-out test split")


parser = argparse.ArgumentParser(description="Reinforcement learning (GRPO-style) of the chat model on GSM8K")
add_training_args(parser)
add_optimizer_args(parser)
parser.add_argument("--source", type=str, default="sft", choices=["mid", "sft"], help="the stage to start from")
parser.add_argument("--step", type=int, default=None, help="source checkpoint step (default: the latest)")
parser.add_argument("--examples-per-step", type=int, default=16, help="questions per optimizer step, over all ranks")
parser.add_argument("--num-samples", type=int, default=16, help="completions sampled per question (the group)")
parser.add_argument("--max-new-tokens", type=int, default=256, help="longest completion, in tokens")
# temperature 1: rollouts come from the model's own distribution, the one whose log-probabilities the policy
# gradient raises or lowers (top-k only cuts its far tail); a group also needs diverse samples to compare
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts and of pass@k")
parser.add_argument("--top-k", type=int, default=50, help="top-k of the rollouts and of pass@k (0 = off)")
parser.add_argument("--divide-by-std", action="store_true", help="divide each group's advantages by its reward std (GRPO)")
parser.add_argument("--num-epochs", type=float, default=1.0, help="passes over the train questions when --num-iterations is -1")
parser.add_argument("--init-lr-frac", type=float, default=0.05, help="every lr starts at this fraction of pretraining's, then decays linearly to 0")
parser.add_argument("--eval-examples", type=int, default=400, help="held-out problems per pass@k evaluation")
parser.add_argument("--eval-samples", type=int, default=4, help="k of pass@k: samples per held-out problem")
parser.add_argument("--seed", type=int, default=0, help="seed of the question order and of the rollouts' sampling")
parser.add_argument("--train-file", type=str, default=None, help="practise on this GSM8K-schema file (.jsonl/.parquet: question, answer)")
parser.add_argument("--test-file", type=str, default=None, help="evaluate on this GSM8K-schema file (with --train-file)")
parser.add_argument("--stand-in-size", type=int, default=2_000, help="offline only: train problems (the test split gets a tenth, at least 100)")
parser.set_defaults(device_batch_size=8, eval_every=60, max_seq_len=-1)
args = parser.parse_args()
check_training_args(parser, args, positive=("device_batch_size", "examples_per_step", "num_samples", "max_new_tokens",
                                            "eval_examples", "eval_samples"))
if args.temperature < 0:
    parser.error(f"--temperature must be 0 or more (got {args.temperature})")
user_config = dict(vars(args))

compute = init_compute(args)
model, tokenizer, source_meta, _ = load_source_model(parser, args.source, args, compute)
model_tag = source_meta["model_tag"]
if args.examples_per_step % compute.world_size:
    parser.error(f"--examples-per-step {args.examples_per_step} is not a multiple of the world size {compute.world_size}")

try:
    train_task, test_task, data_description = rl_data(use_stand_ins(), args.stand_in_size, args.train_file, args.test_file)
except (RuntimeError, ValueError, OSError) as e:  # the hub is unreachable, a file is missing or malformed
    parser.error(str(e))
num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, int(args.num_epochs * len(train_task)) // args.examples_per_step)
print0(f"data: {data_description} | {len(train_task):,} train / {len(test_task):,} held-out problems")
print0(f"steps: {num_iterations:,} | questions per step: {args.examples_per_step} x {args.num_samples} samples "
       f"| rows per learning micro-batch: {args.device_batch_size}")

optimizers = setup_optimizers(model, args, compute, lr_scale=args.init_lr_frac)
checkpoint_dir = os.path.join(get_base_dir(), "chatrl_checkpoints", model_tag)
start_step, _, meta = resume_if_asked(parser, args, checkpoint_dir, model, optimizers, compute)
# Rollouts need the KV-cache engine; the learning step's rows change length every step, so no torch.compile here.
engine = Engine(model, tokenizer)
question_order = list(range(len(train_task)))
random.Random(args.seed).shuffle(question_order)  # the same order on every rank and every resume

logger = StepLogger(compute, num_iterations, model.estimate_flops(), resumed_meta=meta, stage="rl")
history = meta.get("history", {})  # step -> {metric: value}, kept across resumes
last_stats = {}


def evaluate(step):
    model.eval()
    correct = []
    with compute.autocast:
        solved, total = run_generative_eval(test_task, tokenizer, engine, args.eval_samples, args.max_new_tokens, args.temperature,
                                            args.top_k, max_problems=args.eval_examples, correct_samples=correct)
    solved, total, right_samples = all_reduce_sums([solved, total, sum(correct)], compute.device)
    model.train()
    metrics = {"pass@1": right_samples / max(total * args.eval_samples, 1), f"pass@{args.eval_samples}": solved / max(total, 1)}
    history[str(step)] = metrics
    print0(f"step {step:05d} | " + " | ".join(f"{key} {value:.4f}" for key, value in metrics.items()) + f" ({int(total)} held-out problems)")
    compute.wandb.log({"step": step, **{f"val/{key}": value for key, value in metrics.items()}})
    record_curve_point("rl", step, **metrics)


def step_fn(step, lr_multiplier):
    started = time.time()
    model.eval()
    rollouts, flat_groups = [], 0
    with compute.autocast:
        # the step's questions are dealt across ranks; seeds depend on the question, so any rank count samples the same
        for slot in range(compute.rank, args.examples_per_step, compute.world_size):
            index = question_order[(step * args.examples_per_step + slot) % len(question_order)]
            group = sample_group(engine, tokenizer, train_task, train_task[index], args.num_samples, args.max_new_tokens,
                                 args.temperature, args.top_k, seed=(args.seed * 1_000_003 + step) * 1_000_003 + index,
                                 divide_by_std=args.divide_by_std)
            # all right or all wrong: every advantage is 0, the group costs sampling time and teaches nothing
            flat_groups += len({rollout.reward for rollout in group}) == 1
            rollouts += group
    model.train()
    sampled_at = time.time()
    # one optimizer step over all of this step's rollouts (micro-batches of device_batch_size rows): strictly on-policy
    batches = policy_gradient_batches(rollouts, args.device_batch_size, tokenizer.get_bos_token_id(), compute.device)
    loss, positions = train_step(model, optimizers, iter(batches), len(batches), compute.autocast, lr_multiplier,
                                 get_muon_momentum(step))
    loss = loss.item()  # waits for the step, so the learning time is honest
    learned_at = time.time()
    totals = all_reduce_sums([sum(r.reward for r in rollouts), len(rollouts), flat_groups, sum(r.completion_length for r in rollouts),
                              sum(r.tool_calls for r in rollouts), sampled_at - started, learned_at - sampled_at], compute.device)
    reward, rows, flat, length, tool_calls, sampling_time, learning_time = totals
    last_stats.update({"reward": reward / rows, "flat groups": flat / (args.examples_per_step), "length": length / rows,
                       "tool calls": tool_calls / rows, "sampling share": sampling_time / (sampling_time + learning_time),
                       "rollout tok/s": length / max(sampling_time / compute.world_size, 1e-9)})
    compute.wandb.log({"step": step + 1, **{f"rl/{key.replace(' ', '_')}": value for key, value in last_stats.items()}})
    record_curve_point("rl", step + 1, reward=last_stats["reward"])
    return torch.tensor(loss), positions


def save(step):
    save_training_state(checkpoint_dir, step, model, optimizers, None, {
        "step": step, "model_config": dataclasses.asdict(model.config), "user_config": user_config,
        "source": {"stage": args.source, "model_tag": model_tag, "step": source_meta["step"]}, "data": data_description,
        "world_size": compute.world_size, "history": history,
        "smooth_train_loss": logger.smooth_loss, "total_training_time": logger.total_time,
    }, compute)


run_training_loop(start_step, num_iterations, step_fn, logger, evaluate, save, args.eval_every, args.save_every,
                  lambda step: 1.0 - step / num_iterations,
                  extra_log=lambda: {"reward": f"{last_stats['reward']:.3f}", "flat groups": f"{100 * last_stats['flat groups']:.0f}%",
                                     "len": f"{last_stats['length']:.0f}", "tools": f"{last_stats['tool calls']:.2f}",
                                     "sampling": f"{100 * last_stats['sampling share']:.0f}%",
                                     "rollout tok/s": f"{last_stats['rollout tok/s']:,.0f}"})

first, last = history[min(history, key=int)], history[max(history, key=int)]
print0(f"pass@1 on held-out problems: {first['pass@1']:.4f} before RL -> {last['pass@1']:.4f} after")
get_report().log(section="Chat RL", data=[
    user_config,
    {
        "Data": data_description,
        "Source": f"{args.source} {model_tag} step {source_meta['step']}",
        "Number of iterations": num_iterations,
        "Questions x samples per step": f"{args.examples_per_step} x {args.num_samples}",
        "DDP world size": compute.world_size,
        **{f"{key} before RL": value for key, value in first.items()},
        **{f"{key} after RL": value for key, value in last.items()},
        "Final mean reward": last_stats.get("reward", "n/a"),
        "Sampling share of step time": last_stats.get("sampling share", "n/a"),
        **logger.summary(),
    },
])
compute.wandb.finish()
compute_cleanup()
