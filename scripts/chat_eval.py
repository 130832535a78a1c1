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

Offline, point a task at a local copy in the hub schema: --task-file "GSM8K=/data/gsm8k_test.parquet",
or set NANOCHAT_DATA=sample to evaluate on the offline stand-ins (WordNet multiple choice for MMLU/ARC,
synthetic GSM8K-format arithmetic, SpellingBee): their scores are labelled as stand-ins everywhere.
"""
import argparse
import time
from functools import partial


from nanochat.common import COMPUTE_DTYPES, autocast_context, compute_cleanup, compute_init, get_compute_dtype, print0
from nanochat.task_eval import all_reduce_counts, run_categorical_eval, run_generative_eval
from tasks.arc import ARC
from tasks.arithmetic import Arithmetic
from tasks.common import use_stand_ins
from tasks.factqa import FactQA
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee
from tasks.wordnet_mc import WordNetMC

# name -> how to build the eval split (path= can be added for a local copy)
TASKS = {
    "ARC-Easy": partial(ARC, subset="ARC-Easy", split="test"),
    "ARC-Challenge": partial(ARC, subset="ARC-Challenge", split="test"),
    "MMLU": partial(MMLU, subset="all", split="test"),
    "GSM8K": partial(GSM8K, subset="main", split="test"),
    "HumanEval": HumanEval,
    "SpellingBee": partial(SpellingBee, size=256, split="test"),
}
# offline (NANOCHAT_DATA=sample): held-out splits of the stand-ins, never seen in mid or SFT training
STAND_IN_TASKS = {
    "WordNet-MC": partial(WordNetMC, split="test"),  # 4-way lettered multiple choice, like MMLU and ARC
    "Arithmetic": partial(Arithmetic, split="test", size=500),  # GSM8K's format and calculator tool
    "SpellingBee": partial(SpellingBee, size=256, split="test"),
    # facts the model only read in pretraining (FactQA's held-out facts), asked in phrasings it was not trained on
    "FactQA": partial(FactQA, split="test"),
}
# accuracy of random guessing, which ChatCORE centers away
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0,
             "WordNet-MC": 0.25, "Arithmetic": 0.0, "FactQA": 0.0}


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
        if use_stand_ins():
            raise SystemExit("--task-file reads a real benchmark, but NANOCHAT_DATA=sample asks for the stand-ins; unset one")
        paths[name] = path
    return paths


def main():
    parser = argparse.ArgumentParser(description="Evaluate a chat model on ARC, MMLU, GSM8K, HumanEval, SpellingBee; prints ChatCORE")
    parser.add_argument("-i", "--source", type=str, required=True, choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint to evaluate")
    parser.add_argument("-a", "--task-name", type=str, default=None, help=f"tasks separated by '|' (default all: {'|'.join(TASKS)})")
    parser.add_argument("--max-problems", type=int, default=None, help="evaluate at most this many problems per task")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k with k = this)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="maximum tokens per generated reply")
    # greedy by default: one deterministic reply per problem, so pass@1 does not move between runs
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="sample only among the k most likely tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="problems per forward pass for categorical tasks")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint tag, e.g. d20 (default: the largest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--device-type", type=str, default=None, help="cuda|mps|cpu (default: autodetect)")
    parser.add_argument("--task-file", type=str, action="append", default=[], help="NAME=PATH: read a task from a local parquet/jsonl in the hub schema instead of the hub (repeatable)")
    parser.add_argument("--dtype", type=str, default="auto", choices=COMPUTE_DTYPES,
                        help="matmul dtype; auto = bf16 on CUDA and on CPUs with bf16 hardware (AMX, AVX512-BF16), else fp32 (as in training)")
    args = parser.parse_args()

    stand_ins = use_stand_ins()
    tasks = STAND_IN_TASKS if stand_ins else TASKS
    task_names = args.task_name.split("|") if args.task_name else list(tasks)
    unknown = [name for name in task_names if name not in tasks]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {'|'.join(tasks)}"
                         + (" (NANOCHAT_DATA=sample: the offline stand-ins)" if stand_ins else ""))
    task_files = parse_task_files(args.task_file)
    if stand_ins:
        print0("NANOCHAT_DATA=sample: evaluating on the offline STAND-INS, not the real benchmarks")

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    from nanochat.report import get_report

    is_distributed, rank, local_rank, world_size, device = compute_init(args.device_type)
    autocast = autocast_context(device, get_compute_dtype(device, args.dtype))
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot load the {args.source} model: {e}")
    engine = Engine(model, tokenizer)

    accuracies = {}
    for name in task_names:
        try:
            task = tasks[name](path=task_files[name]) if name in task_files else tasks[name]()
        except (RuntimeError, OSError, ValueError) as error:  # hub unreachable, missing or malformed file
            raise SystemExit(f"{error}\nWith this script: --task-file \"{name}=<file.parquet|file.jsonl>\"") from None
        started = time.time()
        with autocast:
            if task.eval_type == "categorical":
                passed, total = run_categorical_eval(task, tokenizer, model, args.batch_size, args.max_problems, device)
            else:
                passed, total = run_generative_eval(task, tokenizer, engine, args.num_samples, args.max_new_tokens,
                                                    args.temperature, args.top_k, args.max_problems)
        # counts, not per-rank accuracies, are summed: ranks can hold different numbers of problems
        passed, total = all_reduce_counts(passed, total, device)
        accuracies[name] = passed / max(total, 1)
        print0(f"{name}: {passed}/{total} = {100 * accuracies[name]:.2f}% ({time.time() - started:.0f} s)")

    # stand-in scores carry their label into the report, so no one mistakes them for the benchmarks
    summary = {f"{name} (stand-in)" if stand_ins else name: accuracy for name, accuracy in accuracies.items()}
    if set(task_names) == set(tasks):  # ChatCORE only means something over the full set
        key = "ChatCORE (stand-ins)" if stand_ins else "ChatCORE"
        summary[key] = chatcore(accuracies)
        print0(f"{key}: {summary[key]:.4f}")
    settings = {"Source": args.source, "Step": meta.get("step", args.step), "Max problems": args.max_problems,
                "Num samples": args.num_samples, "Temperature": args.temperature, "Top-k": args.top_k,
                "Data": "offline STAND-INS (not the real benchmarks)" if stand_ins else "the real benchmarks"}
    get_report().log(section=f"Chat evaluation {args.source}", data=[settings, summary])
    compute_cleanup()


if __name__ == "__main__":
    main()
