"""
The CORE metric of a base model (see nanochat/core_eval.py). Downloads the eval bundle on first use.

    python -m scripts.base_eval                                  # latest base checkpoint, all 22 tasks
    python -m scripts.base_eval --max-per-task 100               # quick look
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval

Writes <base dir>/base_eval/<tag>_<step>.csv and the "Base model evaluation" report section.
(Bits per byte on the pretraining data is scripts/base_loss.py.)
"""
import argparse
import os
import time

import torch.distributed as dist

from nanochat.artifacts import atomic_write
from nanochat.checkpoint_manager import load_model
from nanochat.common import (COMPUTE_DTYPES, autocast_context, compute_cleanup, compute_init, get_base_dir,
                             get_compute_dtype, print0)
from nanochat.core_eval import EVAL_BUNDLE_URL, download_eval_bundle, evaluate_core
from nanochat.report import get_report

parser = argparse.ArgumentParser(description="Evaluate a base model on the CORE benchmark")
parser.add_argument("--model-tag", type=str, default=None, help="checkpoint tag, e.g. d20 (default: the largest model)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
parser.add_argument("--max-per-task", type=int, default=-1, help="evaluate at most this many examples per task (-1 = all)")
parser.add_argument("--dtype", type=str, default="auto", choices=COMPUTE_DTYPES,
                    help="matmul dtype; auto = bf16 on CUDA and on CPUs with bf16 hardware (AMX, AVX512-BF16), else fp32")
parser.add_argument("--device-type", type=str, default=None, help="cuda|mps|cpu (default: autodetect)")
parser.add_argument("--bundle-url", type=str, default=EVAL_BUNDLE_URL, help="where to download the eval bundle zip from if it is not in the base dir yet")
args = parser.parse_args()

is_distributed, rank, local_rank, world_size, device = compute_init(args.device_type)
autocast = autocast_context(device, get_compute_dtype(device, args.dtype))  # the same compute dtype as training

# one rank downloads, the others wait for the finished folder
bundle_dir = os.path.join(get_base_dir(), "eval_bundle")
if rank == 0:
    try:
        bundle_dir = download_eval_bundle(args.bundle_url)
    except RuntimeError as error:  # no network / bad zip: the message says where to put the bundle by hand
        raise SystemExit(str(error)) from None
if is_distributed:
    dist.barrier()

try:
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
except (FileNotFoundError, ValueError) as e:  # nothing trained, a damaged file, a tokenizer that does not match
    parser.error(str(e))
model_tag = args.model_tag or meta.get("model_tag") or f"d{model.config.n_layer}"
step = meta.get("step", args.step)
print0(f"Evaluating base model {model_tag} step {step} on CORE ({world_size} rank(s), max {args.max_per_task} per task)")

started = time.time()
with autocast:
    out = evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=args.max_per_task,
                        max_seq_len=model.config.sequence_len, log=print0)
print0(f"CORE metric: {out['core_metric']:.4f}  ({time.time() - started:.0f} s)")

if rank == 0:
    out_dir = os.path.join(get_base_dir(), "base_eval")
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{model_tag}_{step}.csv")
    with atomic_write(csv_path, "w", encoding="utf-8") as f:
        f.write("Task,Accuracy,Centered\n")
        for label, accuracy in out["results"].items():
            f.write(f"{label},{accuracy:.6f},{out['centered_results'][label]:.6f}\n")
        f.write(f"CORE,,{out['core_metric']:.6f}\n")
    print0(f"Wrote {csv_path}")
get_report().log(section="Base model evaluation", data=[
    {"Model": f"{model_tag} step {step}", "Max per task": args.max_per_task, "CORE": out["core_metric"]},
    out["centered_results"],
])
compute_cleanup()
