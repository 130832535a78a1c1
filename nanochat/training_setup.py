"""
What sets up a training stage before its loop: the flags every stage shares, where it computes (device,
ranks, matmul dtype, wandb), its optimizers, the previous stage's model, and the model the steps run.

The four training scripts (base, mid, SFT, RL) differ in data and in what they evaluate; they share these
flags and this setup, so a flag means the same thing in every stage and is defined once. A script changes
a default with parser.set_defaults() and adds its own flags after these.

Every script calls prepare_model once it has its model (built or loaded, resumed weights in place): it is
the one place for what training does to a model before stepping it: on a CPU, the speed layer of hand-written
backwards (nanochat/cpu_autograd.py), and torch.compile where it pays.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import load_model
from nanochat.common import COMPUTE_DTYPES, autocast_context, compute_init, get_compute_dtype, get_wandb, print0
from nanochat.tokenizer import get_token_bytes

try:  # a speed layer, optional: without it a CPU trains on the plain ops, only slower
    from nanochat.cpu_autograd import CPU_TRAINING_OPS
except ImportError:
    CPU_TRAINING_OPS = None


def add_training_args(parser):
    """The flags every training stage takes; a script changes their defaults with parser.set_defaults()."""
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' = no wandb)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|mps|cpu (empty = autodetect)")
    parser.add_argument("--dtype", type=str, default="auto", choices=COMPUTE_DTYPES,
                        help="matmul dtype (weights stay fp32); auto = bf16 on CUDA and on CPUs with bf16 hardware (AMX, AVX512-BF16), else fp32")
    parser.add_argument("--compile", type=str, default="auto", choices=["auto", "0", "1"],
                        help="torch.compile the model; auto = on CUDA and in bf16 on CPU, where it wins (dev/BENCHMARKS.md)")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint directory name, e.g. d20")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
    parser.add_argument("--device-batch-size", type=int, default=32, help="rows per rank per micro-step (lower it if out of memory)")
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = derived, see the script's help)")
    parser.add_argument("--eval-every", type=int, default=250, help="evaluate every N steps (-1 = only at the end)")
    parser.add_argument("--save-every", type=int, default=-1, help="save a checkpoint every N steps (-1 = only at the end)")
    parser.add_argument("--resume-from-step", type=int, default=None, help="resume from this saved step of this stage (-1 = the latest)")
    parser.add_argument("--resume", action="store_true", help="resume from the latest saved step (same as --resume-from-step -1)")
    parser.add_argument("--resume-if-saved", action="store_true",
                        help="resume from the latest saved step when this stage has one, else start fresh (what speedrun.sh passes)")
    parser.add_argument("--deterministic", action="store_true",
                        help="the same bits on every rerun and resume on this machine (same thread count), compiled or "
                             "not; ~1-5%% slower (dev/BENCHMARKS.md, Determinism). Without it only eager CPU runs are exact")


def add_optimizer_args(parser):
    """
    The learning rates and weight decay of the Muon + AdamW pair (GPT.setup_optimizers). The AdamW rates are
    given for width 768 and scaled by (width / 768)^-0.5 for other widths, so one setting serves every depth.
    """
    parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding (at width 768)")
    parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of the output head (at width 768)")
    parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the block matrices")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")


def add_finetuning_args(parser, sources, default_source, examples_per_step, init_lr_frac):
    """The flags of the stages that finetune an earlier stage's model on examples (SFT: conversations, RL: questions)."""
    parser.add_argument("--source", type=str, default=default_source, choices=sources, help="the stage whose model to start from")
    parser.add_argument("--step", type=int, default=None, help="source checkpoint step (default: the latest)")
    parser.add_argument("--examples-per-step", type=int, default=examples_per_step,
                        help="examples per optimizer step, over all ranks (SFT: conversations, RL: questions)")
    parser.add_argument("--num-epochs", type=float, default=1.0, help="passes over the examples when --num-iterations is -1")
    parser.add_argument("--init-lr-frac", type=float, default=init_lr_frac,
                        help="every lr starts at this fraction of pretraining's, then decays linearly to 0")


def check_training_args(parser, args, positive=("max_seq_len", "device_batch_size")):
    """Shared argument checks: parser.error names the flag to change."""
    # --resume is shorthand; from here on only resume_from_step is read
    if args.resume and args.resume_from_step is None:
        args.resume_from_step = -1
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")


@dataclass
class Compute:
    """Where and how a stage runs: one per process."""
    is_distributed: bool
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype  # matmul dtype under autocast; weights stay fp32
    autocast: object  # context manager for forward passes
    wandb: object  # a wandb run, or DummyWandb

    @property
    def master_process(self):
        return self.rank == 0

    def barrier(self):
        """Wait for every rank (a no-op in a single process): e.g. before reading what rank 0 just wrote."""
        if self.is_distributed:
            dist.barrier()


def set_deterministic():
    """
    Every switch torch has for reproducible results (https://pytorch.org/docs/stable/notes/randomness.html), for
    --deterministic: two runs, and a run and its resume, give the same bits on the same machine, compiled or not.
    Called before anything touches CUDA. Returns what it set, for the log.

    Why a compiled run needs it (dev/BENCHMARKS.md, "Determinism"): inductor compiles the embeddings' backward
    (each token's gradient added into its row) into a C++ loop split over the OpenMP threads that adds with
    atomic_add, so two threads meeting on one row (a token in both halves of the batch) add in whichever order
    they get there. Measured here, 2 threads, depth 2, 6 steps: two compiled runs end with embedding rows up to
    1.4 apart in bf16 (1e-3 in fp32); eager, on 1 thread, or with this switch on, identical. Cost on the CPU
    profile's depth 4: ~5% of tok/s eager, ~1% compiled.
    """
    # cuBLAS (CUDA >= 10.2) may vary from run to run unless its workspace is fixed; it reads this when torch
    # creates its handle, at the first CUDA matmul, and in deterministic mode torch raises without it
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # every op with a nondeterministic kernel (CUDA embedding and scatter backwards, flash attention's backward)
    # takes its deterministic one, and one that has none raises: a run that stops rather than one that varies.
    # Inductor reads it too: index_put and scatter call ATen, which adds in a fixed order, instead of atomics.
    # It also fills every new tensor with NaN (torch.utils.deterministic.fill_uninitialized_memory): most of the
    # eager cost, kept, since a read of memory never written then shows up instead of varying
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False  # picking a kernel by timing it: a race
    import torch._inductor.config as inductor_config  # only here: importing inductor takes a second
    if hasattr(inductor_config, "deterministic"):  # where this torch has it (2.15 does, and sets it with the above)
        # no kernel or tile chosen by timing where the choice changes the numerics (Triton reductions, matmul padding)
        inductor_config.deterministic = True
    # random ops in a compiled graph draw from torch's generator as eager ones do (training has none: no dropout)
    inductor_config.fallback_random = True
    # CPU sums (ATen's and inductor's kernels) are split by thread, so the same bits need the same count: torch's
    # default (the physical cores) or OMP_NUM_THREADS. Logged, so two runs' logs can be compared
    return (f"deterministic: torch.use_deterministic_algorithms(True), CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']}, "
            f"cudnn deterministic without benchmark, inductor deterministic and fallback_random, "
            f"{torch.get_num_threads()} CPU threads (rerun and resume with the same count)")


def init_compute(args, project="nanochat"):
    """Device, process group, compute dtype and wandb from the shared flags."""
    determinism = set_deterministic() if args.deterministic else None  # before compute_init touches CUDA
    is_distributed, rank, _, world_size, device = compute_init(args.device_type or None)
    if determinism:
        print0(determinism)
    # decided from the device alone (CUDA, or CPU flags: AMX, AVX512-BF16), so every rank picks the same dtype
    dtype = get_compute_dtype(device, args.dtype)
    print0(f"device: {device} x {world_size} | compute dtype: {str(dtype).removeprefix('torch.')} (fp32 master weights)")
    # every flag goes into the wandb run's config, so a run can be reproduced from its page
    wandb_run = get_wandb(args.run, project=project, config=dict(vars(args)), master_process=rank == 0)
    return Compute(is_distributed, rank, world_size, device, dtype, autocast_context(device, dtype), wandb_run)


def setup_optimizers(model, args, compute, lr_scale=1.0):
    """Muon + AdamW from the optimizer flags; lr_scale multiplies every lr (finetuning starts lower)."""
    # compute_dtype: Muon's Newton-Schulz runs in the training's matmul dtype (bf16 on CUDA and bf16-capable CPUs)
    return model.setup_optimizers(unembedding_lr=args.unembedding_lr * lr_scale, embedding_lr=args.embedding_lr * lr_scale,
                                  matrix_lr=args.matrix_lr * lr_scale, weight_decay=args.weight_decay, compute_dtype=compute.dtype)


def load_source_model(parser, stage, args, compute):
    """
    The previous stage's model for finetuning (mid from base, SFT from mid, RL from SFT), from --model-tag and
    --step, and the row length: --max-seq-len, or the model's own context when it is -1.
    Returns (model, tokenizer, source: {stage, model_tag, step} of the checkpoint, row length).
    """
    try:
        model, tokenizer, meta = load_model(stage, compute.device, phase="train", model_tag=args.model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        # parser.error: one line saying what is missing or damaged and what to run, not a traceback
        parser.error(f"cannot load the {stage} model: {e}")
    if args.max_seq_len != -1 and args.max_seq_len <= 0:
        parser.error(f"--max-seq-len must be positive, or -1 for the model's own context (got {args.max_seq_len})")
    seq_len = model.config.sequence_len if args.max_seq_len == -1 else args.max_seq_len
    print0(f"{stage} model {meta['model_tag']} step {meta['step']}: {model.num_params():,} parameters | rows of up to {seq_len} tokens")
    return model, tokenizer, {"stage": stage, "model_tag": meta["model_tag"], "step": meta["step"]}, seq_len


def load_token_bytes(parser, compute):
    """The bytes each token stands for, what bits per byte divides by; a damaged file is a parser error saying what to rerun."""
    try:
        return get_token_bytes(device=compute.device)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))


def should_compile(compute, setting="auto", dynamic=False):
    """
    torch.compile where it pays for itself. auto: on CUDA (measured on an H200: 52-54% MFU at depth 12-20,
    ~50-70 s of compiling) and on CPUs computing in bf16 (AMX: ~36% faster steps at depth 4; AVX512-BF16 on an
    EPYC: ~25% faster, 5,000-5,700 vs 4,000-4,700 tok/s); not on fp32
    CPUs (measured on a 2-core EPYC: 3.0-3.3 vs 3.1-3.5 s per CPU-profile step, a wash once the compile
    is paid), and never for dynamic shapes (SFT's changing row lengths: on the H200 the dynamic compile
    had not finished after ~3 minutes at depth 20, longer than eager SFT takes). setting "1" forces it on.
    """
    # an explicit --compile 0|1 always wins over the measured defaults below
    if setting != "auto":
        return setting == "1"
    return not dynamic and (compute.device.type == "cuda" or (compute.device.type == "cpu" and compute.dtype == torch.bfloat16))


def prepare_model(model, compute, compile_setting="auto", dynamic=False):
    """
    The model the training steps run, from the model a stage built or loaded (which saving and sampling keep
    using: a compiled wrapper shares its weights). dynamic: row lengths change between steps.
    """
    if compute.device.type == "cpu" and CPU_TRAINING_OPS is not None:
        # autograd's generic backwards make several passes over each activation, and a CPU is bound by memory
        # bandwidth: the hand-written ones train ~1.36x faster here (dev/bench_cpu_train.py). On a GPU the plain
        # ops are what torch.compile fuses
        model.use_ops(CPU_TRAINING_OPS)
    if not should_compile(compute, compile_setting, dynamic):
        return model
    print0(f"compiling the model (torch.compile, dynamic={dynamic}); the first steps are slower")
    # compiling is lazy: the graph is traced and compiled at the first forward, which is why the first steps
    # (and StepLogger's ETA, which skips them) are slow
    return torch.compile(model, dynamic=dynamic)
