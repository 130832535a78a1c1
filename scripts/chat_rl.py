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
import os
import random
import time

from nanochat.common import compute_cleanup, get_base_dir, print0
from nanochat.curves import record_curve_point
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.rl import policy_gradient_batches, sample_group
from nanochat.task_eval import all_reduce_sums, run_generative_eval
from nanochat.training import get_muon_momentum, is_due, train_step
from nanochat.training_log import StepLogger
from nanochat.training_setup import (add_finetuning_args, add_optimizer_args, add_training_args, check_training_args, init_compute,
                                     load_source_model, prepare_model, setup_optimizers)
from nanochat.training_state import resume_if_asked, save_training_state
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
add_finetuning_args(parser, sources=["mid", "sft"], default_source="sft", examples_per_step=16, init_lr_frac=0.05)
parser.add_argument("--num-samples", type=int, default=16, help="completions sampled per question (the group)")
parser.add_argument("--max-new-tokens", type=int, default=256, help="longest completion, in tokens")
# temperature 1: rollouts come from the model's own distribution, the one whose log-probabilities the policy
# gradient raises or lowers (top-k only cuts its far tail); a group also needs diverse samples to compare
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts and of pass@k")
parser.add_argument("--top-k", type=int, default=50, help="top-k of the rollouts and of pass@k (0 = off)")
parser.add_argument("--divide-by-std", action="store_true", help="divide each group's advantages by its reward std (GRPO)")
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
model, tokenizer, source, _ = load_source_model(parser, args.source, args, compute)
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
checkpoint_dir = os.path.join(get_base_dir(), "chatrl_checkpoints", source["model_tag"])
start_step, _, meta = resume_if_asked(parser, args, checkpoint_dir, model, optimizers, compute)
engine = Engine(model, tokenizer)  # rollouts and pass@k go through the KV-cache engine, on the model itself
orig_model = model
model = prepare_model(model, compute, args.compile, dynamic=True)  # the rows change length every step: eager unless --compile 1
question_order = list(range(len(train_task)))
random.Random(args.seed).shuffle(question_order)  # the same order on every rank and every resume


def evaluate():
    """-> ({"pass@1": ..., "pass@k": ...} on held-out problems, how many problems)."""
    orig_model.eval()
    correct = []
    with compute.autocast:
        solved, total = run_generative_eval(test_task, tokenizer, engine, args.eval_samples, args.max_new_tokens, args.temperature,
                                            args.top_k, max_problems=args.eval_examples, correct_samples=correct)
    solved, total, right_samples = all_reduce_sums([solved, total, sum(correct)], compute.device)
    orig_model.train()
    return {"pass@1": right_samples / max(total * args.eval_samples, 1), f"pass@{args.eval_samples}": solved / max(total, 1)}, total


def sample_rollouts(step):
    """-> (this rank's rollouts of the step's questions, how many of its groups had all rewards equal)."""
    orig_model.eval()
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
    orig_model.train()
    return rollouts, flat_groups


def rollout_stats(rollouts, flat_groups, sampling_time, learning_time):
    """The step's figures over all ranks: mean reward, share of flat groups, completion length, tool calls, time split."""
    totals = all_reduce_sums([sum(r.reward for r in rollouts), len(rollouts), flat_groups, sum(r.completion_length for r in rollouts),
                              sum(r.tool_calls for r in rollouts), sampling_time, learning_time], compute.device)
    reward, rows, flat, length, tool_calls, sampling_time, learning_time = totals
    return {"reward": reward / rows, "flat groups": flat / args.examples_per_step, "length": length / rows,
            "tool calls": tool_calls / rows, "sampling share": sampling_time / (sampling_time + learning_time),
            "rollout tok/s": length / max(sampling_time / compute.world_size, 1e-9)}


logger = StepLogger(compute, num_iterations, orig_model.estimate_flops(), resumed_meta=meta, stage="rl")
history = meta.get("history", {})  # step -> {metric: value}, kept across resumes
stats = {}  # the last step's rollout figures
for step in range(start_step, num_iterations + 1):
    last_step = step == num_iterations
    if is_due(step, args.eval_every, last_step):
        history[str(step)], problems = evaluate()
        logger.log_eval(step, history[str(step)], note=f" ({int(problems)} held-out problems)")
    if last_step or (step > start_step and is_due(step, args.save_every, last_step)):
        save_training_state(checkpoint_dir, step, orig_model, optimizers, None, compute, {
            "user_config": user_config, "source": source, "data": data_description, "history": history, **logger.state_dict()})
    if last_step:
        break
    lr_multiplier = 1.0 - step / num_iterations  # no warmup: the lr starts low already (--init-lr-frac), decays linearly to 0
    with logger.timer:
        started = time.time()
        rollouts, flat_groups = sample_rollouts(step)
        sampled_at = time.time()
        # one optimizer step over all of this step's rollouts (micro-batches of device_batch_size rows): strictly on-policy
        batches = policy_gradient_batches(rollouts, args.device_batch_size, tokenizer.get_bos_token_id(), compute.device)
        loss, tokens = train_step(model, optimizers, iter(batches), len(batches), compute.autocast, lr_multiplier,
                                  get_muon_momentum(step))
        loss = loss.item()  # waits for the step, so the learning time is honest
        stats = rollout_stats(rollouts, flat_groups, sampled_at - started, time.time() - sampled_at)
        compute.wandb.log({"step": step + 1, **{f"rl/{key.replace(' ', '_')}": value for key, value in stats.items()}})
        record_curve_point("rl", step + 1, reward=stats["reward"])
    logger.log(step, loss, tokens, lr_multiplier, {
        "reward": f"{stats['reward']:.3f}", "flat groups": f"{100 * stats['flat groups']:.0f}%", "len": f"{stats['length']:.0f}",
        "tools": f"{stats['tool calls']:.2f}", "sampling": f"{100 * stats['sampling share']:.0f}%",
        "rollout tok/s": f"{stats['rollout tok/s']:,.0f}"})

first, last = history[min(history, key=int)], history[max(history, key=int)]
print0(f"pass@1 on held-out problems: {first['pass@1']:.4f} before RL -> {last['pass@1']:.4f} after")
get_report().log(section="Chat RL", data=[
    user_config,
    {
        "Data": data_description,
        "Source": f"{args.source} {source['model_tag']} step {source['step']}",
        "Number of iterations": num_iterations,
        "Questions x samples per step": f"{args.examples_per_step} x {args.num_samples}",
        "DDP world size": compute.world_size,
        **{f"{key} before RL": value for key, value in first.items()},
        **{f"{key} after RL": value for key, value in last.items()},
        "Final mean reward": stats.get("reward", "n/a"),
        "Sampling share of step time": stats.get("sampling share", "n/a"),
        **logger.summary(),
    },
])
compute.wandb.finish()
compute_cleanup()
