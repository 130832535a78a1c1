"""
Midtraining: the base model meets the chat format. Still next-token prediction on packed rows, like
pretraining, but the documents are now conversations rendered with the chat special tokens: general
chat, lettered multiple choice, math with calculator tool calls, who the assistant is, and spelling.
Targets are every token except each conversation's opening <|bos|> and the tool outputs the engine
forces in (train_on="all"); SFT then narrows the loss to the assistant's turns.

    python -m scripts.mid_train                                        # CPU / MPS / one GPU
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --run mid
    NANOCHAT_DATA=sample python -m scripts.mid_train                   # offline, on the stand-ins

Reads the latest base checkpoint (--model-tag, --step), writes mid_checkpoints/<tag>/.
"""
import argparse
import math
import os

from nanochat.common import compute_cleanup, get_base_dir, print0
from nanochat.dataloader import ConversationLoader, render_at
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.training import get_grad_accum_steps, get_lr_multiplier, get_muon_momentum, is_due, train_step
from nanochat.training_log import StepLogger
from nanochat.training_setup import (add_optimizer_args, add_training_args, check_training_args, init_compute, load_source_model,
                                     load_token_bytes, prepare_model, setup_optimizers)
from nanochat.training_state import resume_if_asked, save_training_state
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


def mid_mixture(stand_ins, stand_in_size):
    """(train mixture, held-out mixture, description). Listing a task twice oversamples it."""
    # each task teaches one thing the base model cannot do yet: SmolTalk the turn structure of general
    # chat, MMLU answering with a letter, GSM8K calling the calculator, identity who it is, the spelling
    # tasks looking inside tokens (a model sees "strawberry" as a few tokens, not ten letters)
    identity = CustomJSON(identity_conversations_path())
    if not stand_ins:
        train = TaskMixture([SmolTalk("train"), MMLU("auxiliary_train", "train"), GSM8K("main", "train"), identity, identity,
                             SimpleSpelling(size=200_000, split="train"), SpellingBee(size=80_000, split="train")])
        val = TaskMixture([SmolTalk("test"), MMLU("all", "test", stop=5200), GSM8K("main", "test", stop=420)])
        return train, val, "SmolTalk, MMLU auxiliary_train, GSM8K train, identity x2, SimpleSpelling 200K, SpellingBee 80K"
    # offline: real text wherever there is some (Wikipedia, WordNet, ChatterBot), synthetic maths and spelling
    n = stand_in_size
    # FactQA three times: a small model needs to be asked about a fact several times before it answers from what it read
    factqa = FactQA("train", phrasings=3)
    train = TaskMixture([ChatterbotConversations("train"), WikipediaQA("train", stop=n), WordNetMC("train", stop=n),
                         Arithmetic("train", size=n), *[factqa] * 3, *[identity] * 8,
                         SimpleSpelling(size=n // 4, split="train"), SpellingBee(size=n // 4, split="train")])
    val = TaskMixture([ChatterbotConversations("test"), WikipediaQA("test", stop=200), WordNetMC("test", stop=200),
                       Arithmetic("test", size=200), FactQA("test", stop=200)])
    return train, val, (f"STAND-INS (offline): ChatterBot, Wikipedia QA {n}, WordNet MC {n}, arithmetic {n}, "
                        f"FactQA {len(factqa)} x3, identity x8, SimpleSpelling {n // 4}, SpellingBee {n // 4}")


def estimate_tokens(dataset, tokenizer, max_tokens, samples=2000):
    """Tokens in one pass over dataset, from an evenly spaced sample of its conversations (exact when small)."""
    # rendering every conversation of a large mixture just to count its tokens would take minutes
    indexes = range(0, len(dataset), max(1, len(dataset) // samples))
    lengths = [len(render_at(dataset, i, tokenizer, max_tokens)[0]) for i in indexes]
    return sum(lengths) / len(lengths) * len(dataset)


parser = argparse.ArgumentParser(description="Midtrain the base model on chat-formatted data")
add_training_args(parser)
add_optimizer_args(parser)
parser.add_argument("--step", type=int, default=None, help="base checkpoint step to start from (default: the latest)")
parser.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step, over all ranks and micro-steps")
parser.add_argument("--num-epochs", type=float, default=1.0, help="passes over the mixture when --num-iterations is -1")
parser.add_argument("--warmdown-ratio", type=float, default=0.2, help="the lr holds, then decays to 0 over this last fraction")
parser.add_argument("--eval-tokens", type=int, default=20 * 524288, help="held-out tokens per evaluation (at most one pass)")
parser.add_argument("--stand-in-size", type=int, default=20_000, help="offline only: examples per stand-in task")
parser.set_defaults(max_seq_len=-1, eval_every=150)  # -1: rows as long as the base model's context
args = parser.parse_args()
check_training_args(parser, args, positive=("device_batch_size", "total_batch_size", "eval_tokens"))
user_config = dict(vars(args))

compute = init_compute(args)
model, tokenizer, source, seq_len = load_source_model(parser, "base", args, compute)
token_bytes = load_token_bytes(parser, compute)

stand_ins = use_stand_ins()
try:
    train_data, val_data, data_description = mid_mixture(stand_ins, args.stand_in_size)
except RuntimeError as e:  # the hub is unreachable
    parser.error(str(e))
print0(f"data: {data_description} | {len(train_data):,} train / {len(val_data):,} held-out conversations")

try:
    grad_accum_steps = get_grad_accum_steps(args.total_batch_size, args.device_batch_size, seq_len, compute.world_size)
except ValueError as e:
    parser.error(str(e))
if args.num_iterations > 0:
    num_iterations = args.num_iterations
else:
    epoch_tokens = estimate_tokens(train_data, tokenizer, seq_len + 1)
    num_iterations = max(1, math.ceil(args.num_epochs * epoch_tokens / args.total_batch_size))
    print0(f"one epoch is ~{epoch_tokens:,.0f} tokens (estimated from a sample of the conversations)")
eval_steps = max(1, args.eval_tokens // (args.device_batch_size * seq_len * compute.world_size))
print0(f"steps: {num_iterations:,} | tokens per step: {args.total_batch_size:,} | grad accumulation: {grad_accum_steps}")

optimizers = setup_optimizers(model, args, compute)
checkpoint_dir = os.path.join(get_base_dir(), "mid_checkpoints", source["model_tag"])
start_step, loader_state, meta = resume_if_asked(parser, args, checkpoint_dir, model, optimizers, compute)
orig_model = model
model = prepare_model(model, compute, args.compile)
train_loader = ConversationLoader(train_data, tokenizer, args.device_batch_size, seq_len, device=compute.device,
                                  resume_state=loader_state)


def evaluate_val_bpb():
    model.eval()
    val_loader = ConversationLoader(val_data, tokenizer, args.device_batch_size, seq_len, device=compute.device, single_pass=True)
    with compute.autocast:
        bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
    model.train()
    return bpb


logger = StepLogger(compute, num_iterations, orig_model.estimate_flops(), resumed_meta=meta, stage="mid")
val_bpbs = meta.get("val_bpbs", {})  # step -> val bpb, kept across resumes
for step in range(start_step, num_iterations + 1):
    last_step = step == num_iterations
    if is_due(step, args.eval_every, last_step):
        val_bpbs[str(step)] = evaluate_val_bpb()
        logger.log_eval(step, {"val bpb": val_bpbs[str(step)]}, note=" (held-out conversations)")
    if last_step or (step > start_step and is_due(step, args.save_every, last_step)):
        save_training_state(checkpoint_dir, step, orig_model, optimizers, train_loader, compute, {
            "user_config": user_config, "source": source, "data": data_description, "max_seq_len": seq_len,
            "val_bpbs": val_bpbs, **logger.state_dict()})
    if last_step:
        break
    # the lr holds at the base model's peak, then decays to zero: midtraining continues pretraining, it never warms up again
    lr_multiplier = get_lr_multiplier(step, num_iterations, 0.0, args.warmdown_ratio, 0.0)
    with logger.timer:
        loss, tokens = train_step(model, optimizers, train_loader, grad_accum_steps, compute.autocast, lr_multiplier,
                                  get_muon_momentum(step))
    logger.log(step, loss, tokens, lr_multiplier, {"epoch": f"{train_loader.epoch_progress:.2f}"})

steps_evaluated = sorted(val_bpbs, key=int)
print0(f"done: val bpb {val_bpbs[steps_evaluated[-1]]:.4f} | training time {logger.summary()['Total training time']}")
get_report().log(section="Midtraining", data=[
    user_config,
    {
        "Data": data_description,
        "Source": f"base {source['model_tag']} step {source['step']}",
        "Conversations (train / held-out)": f"{len(train_data):,} / {len(val_data):,}",
        "Number of iterations": num_iterations,
        "Epochs": round(train_loader.epoch_progress, 3),
        "Tokens per step": args.total_batch_size,
        "DDP world size": compute.world_size,
        "Initial val bpb": val_bpbs[steps_evaluated[0]],
        "Final val bpb": val_bpbs[steps_evaluated[-1]],
        **logger.summary(),
    },
])
compute.wandb.finish()
compute_cleanup()
