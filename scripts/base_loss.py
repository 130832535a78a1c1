"""
Evaluate a base model: bits per byte on more train and val tokens than training's periodic evals,
plus greedy completions of a few fixed prompts.

    python -m scripts.base_loss
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss -- --device-batch-size 32
"""
import argparse

from nanochat.checkpoint_manager import load_model
from nanochat.common import COMPUTE_DTYPES, autocast_context, compute_cleanup, compute_init, get_compute_dtype, print0
from nanochat.dataloader import PretrainLoader
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]

parser = argparse.ArgumentParser(description="Bits per byte and samples of a base model")
parser.add_argument("--dtype", type=str, default="auto", choices=COMPUTE_DTYPES,
                    help="matmul dtype; auto = bf16 on CUDA and on CPUs with bf16 hardware (AMX, AVX512-BF16), else fp32")
parser.add_argument("--device-type", type=str, default="", help="cuda|mps|cpu (empty = autodetect)")
parser.add_argument("--device-batch-size", type=int, default=32, help="sequences per rank per forward pass")
parser.add_argument("--split-tokens", type=int, default=20 * 524288, help="tokens to evaluate per split")
parser.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag (default: the deepest)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate per prompt")
args = parser.parse_args()
if args.device_batch_size <= 0 or args.split_tokens <= 0:
    parser.error("--device-batch-size and --split-tokens must be positive")

is_distributed, rank, local_rank, world_size, device = compute_init(args.device_type or None)
autocast_ctx = autocast_context(device, get_compute_dtype(device, args.dtype))  # the same compute dtype as training
try:
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
    token_bytes = get_token_bytes(device=device)
except (FileNotFoundError, ValueError) as e:  # nothing trained, a damaged file, a tokenizer that does not match
    parser.error(str(e))
seq_len = model.config.sequence_len
steps = args.split_tokens // (args.device_batch_size * seq_len * world_size)
if steps < 1:
    parser.error(f"--split-tokens {args.split_tokens} is less than one batch over all ranks "
                 f"({args.device_batch_size * seq_len * world_size} tokens); raise it")

results = {}
for split in ("train", "val"):
    loader = PretrainLoader(tokenizer, args.device_batch_size, seq_len, split, device=device, single_pass=True)  # never a split twice
    with autocast_ctx:
        results[f"{split} bpb"] = evaluate_bpb(model, loader, steps, token_bytes)
    print0(f"{split} bpb: {results[f'{split} bpb']:.4f}")

samples = []
if rank == 0:
    for prompt in PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        with autocast_ctx:
            completion = list(model.generate(tokens, max_tokens=args.max_new_tokens, temperature=0))
        samples.append(prompt + tokenizer.decode(completion))
        print0(repr(samples[-1]))

get_report().log(section="Base model loss", data=[
    {"model step": meta["step"], "tokens per split": steps * args.device_batch_size * seq_len * world_size, **results},
    "Samples:",
    *[f"- `{sample}`" for sample in samples],
])
compute_cleanup()
