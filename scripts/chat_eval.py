"""
Evaluate a chat model on the chat tasks and compute ChatCORE.

    python -m scripts.chat_eval -i sft                               # every task
    python -m scripts.chat_eval -i mid -a "ARC-Easy|MMLU" --max-problems 200
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -i rl -a GSM8K --num-samples 8 --temperature 1.0

Categorical tasks (multiple choice) need one batched forward pass: the answer is whichever allowed
letter has the highest logit right after <|assistant_start|>. Generative tasks sample replies through
the Engine (with tool use) and count a problem as solved if any of --num-samples replies is right
(pass@k). ChatCORE = mean over tasks of (accuracy - baseline) / (1 - baseline), the baseline being
random guessing: 0.25 for 4-way multiple choice, 0 for generative tasks.

Offline, point a task at a local copy in the hub schema: --task-file "GSM8K=/data/gsm8k_test.parquet".
"""
import argparse
import contextlib
import time
from functools import partial

import torch
import torch.distributed as dist

from nanochat.common import compute_cleanup, compute_init, get_dist_info, print0
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

# name -> how to build the eval split (path= can be added for a local copy)
TASKS = {
    "ARC-Easy": partial(ARC, subset="ARC-Easy", split="test"),
    "ARC-Challenge": partial(ARC, subset="ARC-Challenge", split="test"),
    "MMLU": partial(MMLU, subset="all", split="test"),
    "GSM8K": partial(GSM8K, subset="main", split="test"),
    "HumanEval": HumanEval,
    "SpellingBee": partial(SpellingBee, size=256, split="test"),
}
# accuracy of random guessing, which ChatCORE centers away
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}


def letter_token_ids(tokenizer, letters, cache):
    """The single token id of each answer letter (the categorical eval compares exactly these logits)."""
    ids = []
    for letter in letters:
        if letter not in cache:
            encoded = tokenizer.encode(letter)
            if len(encoded) != 1:
                raise ValueError(f"answer letter {letter!r} is {len(encoded)} tokens in this tokenizer; categorical eval needs one")
            cache[letter] = encoded[0]
        ids.append(cache[letter])
    return ids


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model, batch_size, max_problems=None, device="cpu"):
    """(num_passed, total) over this rank's share of the problems; batches are strided across ranks."""
    _, rank, _, world_size = get_dist_info()
    num_problems = len(task) if max_problems is None else min(len(task), max_problems)
    num_batches = -(-num_problems // batch_size)
    pad = tokenizer.get_bos_token_id()  # right padding: it comes after every answer position, so it is never read
    letter_cache = {}
    num_passed, total = 0, 0
    for batch_index in range(rank, num_batches, world_size):
        conversations = [task[i] for i in range(batch_index * batch_size, min((batch_index + 1) * batch_size, num_problems))]
        prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
        max_length = max(len(ids) for ids in prompts)
        inputs = torch.tensor([ids + [pad] * (max_length - len(ids)) for ids in prompts], dtype=torch.long, device=device)
        logits = model(inputs)
        for row, (conversation, ids) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            # the logits at the last prompt token (<|assistant_start|>) predict the first answer token
            letter_logits = logits[row, len(ids) - 1, letter_token_ids(tokenizer, letters, letter_cache)]
            predicted = letters[letter_logits.argmax().item()]
            num_passed += int(task.evaluate(conversation, predicted))
            total += 1
    return num_passed, total


def run_generative_eval(task, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k, max_problems=None, log=print0):
    """(num_passed, total) over this rank's share (problems strided across ranks); passed = any sample right (pass@k)."""
    _, rank, _, world_size = get_dist_info()
    num_problems = len(task) if max_problems is None else min(len(task), max_problems)
    num_passed, total = 0, 0
    started = time.time()
    for i in range(rank, num_problems, world_size):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=i)
        replies = [tokenizer.decode(result[len(prompt):]) for result in results]
        num_passed += int(any(task.evaluate(conversation, reply) for reply in replies))
        total += 1
        if total % 10 == 0 or i + world_size >= num_problems:
            done = min(num_problems, i + 1)
            eta = (time.time() - started) / done * (num_problems - done)
            log(f"\r  {done}/{num_problems} passed {num_passed}/{total} on rank {rank} ({100 * num_passed / total:.1f}%), ETA {eta:.0f} s", end="")
    log("")
    return num_passed, total


def all_reduce_counts(num_passed, total, device):
    """Sum (passed, total) over ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return num_passed, total
    counts = torch.tensor([num_passed, total], dtype=torch.long, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts[0].item(), counts[1].item()


def chatcore(accuracies):
    """Mean centered accuracy over the tasks in `accuracies`."""
    centered = [(acc - BASELINES[name]) / (1.0 - BASELINES[name]) for name, acc in accuracies.items()]
    return sum(centered) / len(centered)


def parse_task_files(items):
    """['GSM8K=/x.parquet', ...] -> {'GSM8K': '/x.parquet'}"""
    paths = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in TASKS:
            raise SystemExit(f"--task-file wants NAME=PATH with NAME one of {', '.join(TASKS)}; got {item!r}")
        paths[name] = path
    return paths


def main():
    parser = argparse.ArgumentParser(description="Evaluate a chat model on ARC, MMLU, GSM8K, HumanEval, SpellingBee; prints ChatCORE")
    parser.add_argument("-i", "--source", type=str, required=True, choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint to evaluate")
    parser.add_argument("-a", "--task-name", type=str, default=None, help=f"tasks separated by '|' (default all: {'|'.join(TASKS)})")
    parser.add_argument("--max-problems", type=int, default=None, help="evaluate at most this many problems per task")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k with k = this)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="maximum tokens per generated reply")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="sample only among the k most likely tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="problems per forward pass for categorical tasks")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint tag, e.g. d20 (default: the largest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--device-type", type=str, default=None, help="cuda|mps|cpu (default: autodetect)")
    parser.add_argument("--task-file", type=str, action="append", default=[], help="NAME=PATH: read a task from a local parquet/jsonl in the hub schema instead of the hub (repeatable)")
    args = parser.parse_args()

    task_names = args.task_name.split("|") if args.task_name else list(TASKS)
    unknown = [name for name in task_names if name not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {'|'.join(TASKS)}")
    task_files = parse_task_files(args.task_file)

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    from nanochat.report import get_report

    is_distributed, rank, local_rank, world_size, device = compute_init(args.device_type)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)

    accuracies = {}
    for name in task_names:
        try:
            task = TASKS[name](path=task_files[name]) if name in task_files else TASKS[name]()
        except (RuntimeError, OSError, ValueError) as error:  # hub unreachable, missing or malformed file
            raise SystemExit(f"{error}\nWith this script: --task-file \"{name}=<file.parquet|file.jsonl>\"") from None
        started = time.time()
        with autocast:
            if task.eval_type == "categorical":
                passed, total = run_categorical_eval(task, tokenizer, model, args.batch_size, args.max_problems, device)
            else:
                passed, total = run_generative_eval(task, tokenizer, engine, args.num_samples, args.max_new_tokens,
                                                    args.temperature, args.top_k, args.max_problems)
        passed, total = all_reduce_counts(passed, total, device)
        accuracies[name] = passed / max(total, 1)
        print0(f"{name}: {passed}/{total} = {100 * accuracies[name]:.2f}% ({time.time() - started:.0f} s)")

    summary = dict(accuracies)
    if set(task_names) == set(TASKS):  # ChatCORE only means something over the full set
        summary["ChatCORE"] = chatcore(accuracies)
        print0(f"ChatCORE: {summary['ChatCORE']:.4f}")
    settings = {"Source": args.source, "Step": meta.get("step", args.step), "Max problems": args.max_problems,
                "Num samples": args.num_samples, "Temperature": args.temperature, "Top-k": args.top_k}
    get_report().log(section=f"Chat evaluation {args.source}", data=[settings, summary])
    compute_cleanup()


if __name__ == "__main__":
    main()
