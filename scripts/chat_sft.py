"""
Supervised finetuning (SFT): the midtrained model learns to answer. One conversation per row, padded
(no packing: every row starts at a conversation's beginning, as at inference), and the loss covers only
what the assistant must produce: its text, its tool calls and <|assistant_end|>. Never the user's words,
the tool outputs or the padding. The loss of a step is the mean over all its assistant tokens, on every
rank (nanochat/training.py: train_step), so batch size, accumulation and world size leave the gradient alone.

    python -m scripts.chat_sft                                          # from the latest mid checkpoint
    python -m scripts.chat_sft --source base                            # skip midtraining
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run sft
    NANOCHAT_DATA=sample python -m scripts.chat_sft                     # offline, on the stand-ins

Writes chatsft_checkpoints/<tag>/.
"""
import argparse
import os

from nanochat.common import compute_cleanup, get_base_dir, print0
from nanochat.dataloader import SFTLoader
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.task_eval import all_reduce_counts, run_categorical_eval, turn_end_rate
from nanochat.training import get_muon_momentum, is_due, train_step
from nanochat.training_log import StepLogger
from nanochat.training_setup import (add_finetuning_args, add_optimizer_args, add_training_args, check_training_args, init_compute,
                                     load_source_model, load_token_bytes, prepare_model, setup_optimizers)
from nanochat.training_state import resume_if_asked, save_training_state
from tasks.arc import ARC
from tasks.arithmetic import Arithmetic
from tasks.chatterbot import ChatterbotConversations
from tasks.common import TaskMixture, use_stand_ins
from tasks.customjson import CustomJSON, identity_conversations_path
from tasks.factqa import FactQA
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee
from tasks.wikiqa import WikipediaQA
from tasks.wordnet_mc import WordNetMC


def sft_data(stand_ins, stand_in_size):
    """(train mixture, held-out conversations, {name: multiple-choice task to track accuracy on}, description)."""
    identity = CustomJSON(identity_conversations_path())
    if not stand_ins:
        train = TaskMixture([ARC("ARC-Easy", "train"), ARC("ARC-Challenge", "train"), GSM8K("main", "train"),
                             SmolTalk("train", stop=10_000), identity, SimpleSpelling(size=300, split="train"),
                             SpellingBee(size=300, split="train")])
        accuracy_tasks = {"MMLU": MMLU("all", "test"), "ARC-Easy": ARC("ARC-Easy", "test")}
        description = "ARC-Easy + ARC-Challenge train, GSM8K train, SmolTalk 10K, identity, SimpleSpelling 300, SpellingBee 300"
        return train, SmolTalk("test"), accuracy_tasks, description
    n = stand_in_size
    factqa = FactQA("train", phrasings=1, stop=2 * n)  # one more pass over the facts, one phrasing each
    train = TaskMixture([WordNetMC("train", stop=n), Arithmetic("train", size=n),
                         ChatterbotConversations("train"), WikipediaQA("train", stop=n), factqa, *[identity] * 4,
                         SimpleSpelling(size=n // 10, split="train"), SpellingBee(size=n // 10, split="train")])
    held_out = TaskMixture([ChatterbotConversations("test"), WikipediaQA("test", stop=100), Arithmetic("test", size=100),
                            FactQA("test", stop=100)])
    description = (f"STAND-INS (offline): WordNet MC {n}, arithmetic {n}, ChatterBot, Wikipedia QA {n}, FactQA {len(factqa)}, "
                   f"identity x4, SimpleSpelling {n // 10}, SpellingBee {n // 10}")
    return train, held_out, {"WordNet-MC (stand-in)": WordNetMC("test")}, description


parser = argparse.ArgumentParser(description="Supervised finetuning of the chat model")
add_training_args(parser)
add_optimizer_args(parser)
add_finetuning_args(parser, sources=["base", "mid"], default_source="mid", examples_per_step=32, init_lr_frac=0.02)  # base: skip mid
parser.add_argument("--eval-steps", type=int, default=100, help="held-out micro-batches per val loss evaluation (at most one pass)")
parser.add_argument("--eval-max-problems", type=int, default=256,
                    help="multiple-choice problems per accuracy evaluation (and at most 32 prompts for the turn-end check)")
parser.add_argument("--stand-in-size", type=int, default=5_000, help="offline only: examples per stand-in task")
parser.set_defaults(device_batch_size=4, max_seq_len=-1, eval_every=100)
args = parser.parse_args()
check_training_args(parser, args, positive=("device_batch_size", "examples_per_step", "eval_steps"))
user_config = dict(vars(args))

compute = init_compute(args)
model, tokenizer, source, max_seq_len = load_source_model(parser, args.source, args, compute)
token_bytes = load_token_bytes(parser, compute)

try:
    train_data, val_data, accuracy_tasks, data_description = sft_data(use_stand_ins(), args.stand_in_size)
except RuntimeError as e:  # the hub is unreachable
    parser.error(str(e))
print0(f"data: {data_description} | {len(train_data):,} train / {len(val_data):,} held-out conversations")

rows_per_micro_step = args.device_batch_size * compute.world_size
if args.examples_per_step % rows_per_micro_step:
    parser.error(f"--examples-per-step {args.examples_per_step} is not a multiple of --device-batch-size {args.device_batch_size} "
                 f"x world size {compute.world_size} = {rows_per_micro_step}; change one of them")
grad_accum_steps = args.examples_per_step // rows_per_micro_step
num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, int(args.num_epochs * len(train_data)) // args.examples_per_step)
print0(f"steps: {num_iterations:,} | conversations per step: {args.examples_per_step} | grad accumulation: {grad_accum_steps}")

# 2% of pretraining's learning rates: SFT's few thousand conversations should adjust the model, not
# overwrite what pretraining put there (large steps on a small dataset overfit it and forget the rest)
optimizers = setup_optimizers(model, args, compute, lr_scale=args.init_lr_frac)
checkpoint_dir = os.path.join(get_base_dir(), "chatsft_checkpoints", source["model_tag"])
start_step, loader_state, meta = resume_if_asked(parser, args, checkpoint_dir, model, optimizers, compute)
orig_model = model
model = prepare_model(model, compute, args.compile, dynamic=True)  # row lengths change every micro-batch: eager unless --compile 1
train_loader = SFTLoader(train_data, tokenizer, args.device_batch_size, max_seq_len, grad_accum_steps, device=compute.device,
                         resume_state=loader_state)
turn_end_prompts = [val_data[i] for i in range(min(32, args.eval_max_problems, len(val_data)))]


def measure_turn_ends():
    """Does the model close its turns? Greedy replies to held-out prompts that end with <|assistant_end|>."""
    print0(f"measuring how many greedy replies to {len(turn_end_prompts)} held-out prompts end their turn...")
    orig_model.eval()
    engine = Engine(orig_model, tokenizer, run_tools=False)  # only the format is measured: no sandbox process per junk tool call
    with compute.autocast:
        ended, total = all_reduce_counts(*turn_end_rate(engine, tokenizer, turn_end_prompts, max_tokens=96), compute.device)
    orig_model.train()
    return f"{ended}/{total}"


def evaluate():
    """-> {metric: value}: val bpb on held-out conversations, accuracy on each multiple-choice task."""
    model.eval()
    val_loader = SFTLoader(val_data, tokenizer, args.device_batch_size, max_seq_len, device=compute.device, single_pass=True)
    with compute.autocast:
        metrics = {"val bpb": evaluate_bpb(model, val_loader, args.eval_steps, token_bytes)}
        for name, task in accuracy_tasks.items():
            passed, total = all_reduce_counts(*run_categorical_eval(task, tokenizer, model, args.device_batch_size,
                                                                    args.eval_max_problems, compute.device), compute.device)
            metrics[f"{name} accuracy"] = passed / max(total, 1)
    model.train()
    return metrics


# the source model's rate, measured once and kept in the checkpoint meta, so a resumed run compares against it too
source_turn_ends = meta.get("source_turn_ends") or measure_turn_ends()
print0(f"{args.source} model: replies ending with <|assistant_end|> within 96 tokens: {source_turn_ends}")

logger = StepLogger(compute, num_iterations, orig_model.estimate_flops(), resumed_meta=meta, stage="sft")
history = meta.get("history", {})  # step -> {metric: value}, kept across resumes
for step in range(start_step, num_iterations + 1):
    last_step = step == num_iterations
    if is_due(step, args.eval_every, last_step):
        history[str(step)] = evaluate()
        logger.log_eval(step, history[str(step)])
    if last_step or (step > start_step and is_due(step, args.save_every, last_step)):
        save_training_state(checkpoint_dir, step, orig_model, optimizers, train_loader, compute, {
            "user_config": user_config, "source": source, "data": data_description, "max_seq_len": max_seq_len,
            "history": history, "source_turn_ends": source_turn_ends, **logger.state_dict()})
    if last_step:
        break
    lr_multiplier = 1.0 - step / num_iterations  # no warmup and no flat phase: the lr starts low already, decays linearly to 0
    with logger.timer:
        loss, tokens = train_step(model, optimizers, train_loader, grad_accum_steps, compute.autocast, lr_multiplier,
                                  get_muon_momentum(step))
    logger.log(step, loss, tokens, lr_multiplier,
               {"padded": f"{100 * train_loader.padded_fraction:.0f}%", "epoch": f"{train_loader.epoch_progress:.2f}"})

turn_ends = measure_turn_ends()
print0(f"SFT model: replies ending with <|assistant_end|> within 96 tokens: {turn_ends} ({args.source} model: {source_turn_ends})")

first, last = history[min(history, key=int)], history[max(history, key=int)]
get_report().log(section="Chat SFT", data=[
    user_config,
    {
        "Data": data_description,
        "Source": f"{args.source} {source['model_tag']} step {source['step']}",
        "Conversations (train / held-out)": f"{len(train_data):,} / {len(val_data):,}",
        "Number of iterations": num_iterations,
        "Epochs": round(train_loader.epoch_progress, 3),
        "DDP world size": compute.world_size,
        "Padded fraction of the rows": round(train_loader.padded_fraction, 4),
        **{f"Initial {key}": value for key, value in first.items()},
        **{f"Final {key}": value for key, value in last.items()},
        f"Replies ending their turn, {args.source} model (held-out prompts)": source_turn_ends,
        "Replies ending their turn, SFT model": turn_ends,
        **logger.summary(),
    },
])
compute.wandb.finish()
compute_cleanup()
