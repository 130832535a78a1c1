"""
Shared plumbing: base directory, device detection, torch.distributed init, rank-0 logging.

Distributed runs follow torchrun's convention: one process per GPU, each told its RANK, LOCAL_RANK and
WORLD_SIZE in the environment. Without those variables everything runs as rank 0 of 1, so the same
script works unchanged under `python -m` and under `torchrun`.
"""
import functools
import logging
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

# Configured on import, once: every script imports this module, so every stage logs with one format and
# timestamps, which is what makes the interleaved output of a long speedrun readable afterwards.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logger = logging.getLogger("nanochat")


def get_base_dir():
    """
    Where every artifact of a run lives: $NANOCHAT_BASE_DIR, default ~/.cache/nanochat. Stages hand their
    results to each other only through files here (docs/artifacts.md), so one run is one directory.
    """
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def get_dist_info():
    """(is_distributed, rank, local_rank, world_size), read from torchrun's environment."""
    # From the environment, not from torch.distributed: it answers before the process group exists (and in
    # processes that never join one), and every rank reads the same answer without talking to the others.
    # RANK is global (0..world_size-1), LOCAL_RANK the process's index on its own machine: which GPU it drives.
    if all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(*args, **kwargs):
    """print on rank 0 only (eight ranks printing the same line is noise). flush: a line shows up at once even
    when stdout is a pipe or a file (a log, a test capturing it), where Python would otherwise buffer it."""
    if get_dist_info()[1] == 0:
        print(*args, **kwargs, flush=True)


def autodetect_device_type():
    """The fastest device present: a CUDA GPU, then Apple's GPU (MPS), then the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@functools.cache
def cpu_has_fast_bf16():
    """
    True when this CPU multiplies bf16 matrices in hardware: Intel AMX (Sapphire Rapids and later) or the
    AVX512-BF16 dot-product instructions (AMD Zen 4 and later, Intel Cooper Lake). Measured on 2-core VMs,
    depth-4 training steps at batch 8 x 512:
        AMX Xeon:             bf16 matmuls 1,100-2,400 GFLOP/s vs 250-330 in fp32, steps ~2x faster
        EPYC with AVX512-BF16: 4,000-4,700 tok/s eager and 5,000-5,700 compiled vs 2,400-2,900 in fp32
        EPYC without either:  bf16 matmuls emulated at ~0.9 GFLOP/s, far slower than fp32
    so the answer must come from the hardware, not be assumed. A flag, not a timing, so every rank of a
    distributed run decides the same.
    """
    try:
        # private, so tolerate them moving or failing
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# the --dtype choices
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def get_compute_dtype(device, requested="auto"):
    """
    The dtype matmuls run in under autocast (weights stay fp32). auto: bf16 on CUDA (fp32 on GPUs without
    bf16), bf16 on CPUs with bf16 matmul hardware (AMX or AVX512-BF16), fp32 on other CPUs and on MPS.
    """
    if requested not in COMPUTE_DTYPES:
        raise ValueError(f"--dtype must be auto, float32 or bfloat16 (got {requested!r})")
    if requested == "float32":
        return torch.float32
    if requested == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def autocast_context(device, dtype):
    """
    bf16 compute with fp32 master weights; a no-op context for fp32. Autocast casts the inputs of matmuls
    (and other ops on its list) to bf16 as they run, while the parameters stay fp32 ("master weights", as in
    Micikevicius et al. 2018, Mixed Precision Training). Why: bf16 has 8 bits of mantissa, so in a bf16 weight
    an update smaller than ~1/256 of the weight would be rounded away entirely; fp32 keeps small steps adding up.
    """
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compute_init(device_type=None):
    """
    Pick the device, seed, and join the process group when launched by torchrun
    (NCCL on CUDA, gloo elsewhere). Returns (is_distributed, rank, local_rank, world_size, device).
    """
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"--device-type must be one of cuda, mps, cpu (got {device_type!r})")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device-type cuda was requested but torch sees no CUDA device; use --device-type cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device-type mps was requested but MPS is not available; use --device-type cpu")
    # the same seed on every rank: each builds and initialises its own copy of the model, and there is no
    # DDP wrapper to broadcast rank 0's weights, so identical seeds are what make the copies identical
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
        # TF32 for any fp32 matmul left outside autocast: tensor cores at a 10-bit mantissa instead of fp32's 23
        torch.set_float32_matmul_precision("high")
    is_distributed, rank, local_rank, world_size = get_dist_info()
    if is_distributed and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # device_id binds the NCCL communicator to this GPU now, not lazily at the first collective
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif is_distributed:
        device = torch.device(device_type)
        # gloo: torch's CPU backend (NCCL only moves CUDA tensors); how the tests run several ranks on one CPU
        dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    if rank == 0:
        logger.info(f"device={device} world_size={world_size}")
    return is_distributed, rank, local_rank, world_size, device


def compute_cleanup():
    """Leave the process group at the end of a script (a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        # let every rank arrive first: tearing gloo down while a peer is still writing files or
        # talking aborts that peer ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()


class DummyWandb:
    """Stands in for a wandb run when no run name is given (--run dummy), so callers never branch."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def wandb_logged_in():
    """Whether wandb has an API key: $WANDB_API_KEY, or the netrc entry `wandb login` writes for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def get_wandb(run_name, project="nanochat", config=None, master_process=True):
    """
    A wandb run named run_name, or DummyWandb for "dummy" (and on every rank but 0). The login is checked
    here, at the start of a stage: without it wandb.init would prompt or fail only after the model is built.
    Run files go under $NANOCHAT_BASE_DIR/wandb, not into whatever directory the script was started from.
    """
    # one wandb run per training, logged by rank 0: the other ranks' figures are the same after the all_reduces
    if run_name == "dummy" or not master_process:
        return DummyWandb()
    directory = os.path.join(get_base_dir(), "wandb")
    # offline, dryrun and disabled never talk to the server, so they need no key
    mode = os.environ.get("WANDB_MODE", "online")
    if mode not in ("offline", "dryrun", "disabled") and not wandb_logged_in():
        raise SystemExit(f"--run {run_name} logs to Weights & Biases, but wandb has no API key on this machine. "
                         f"Run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to keep the run in "
                         f"{directory} and `wandb sync` it later, or leave --run at dummy (WANDB_RUN unset for speedrun.sh).")
    # imported only here: wandb takes most of a second to import, and most runs (--run dummy) never use it
    import wandb

    os.makedirs(directory, exist_ok=True)
    return wandb.init(project=project, name=run_name, config=config, dir=directory)


def format_duration(seconds, separator=""):
    """3723.9 -> '1h02m03s' (log lines); with separator=" ", '1h 02m 03s' (the report). Whole seconds, truncated."""
    # minutes and seconds zero-padded so that a column of elapsed times in the log lines up
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return separator.join([f"{hours}h", f"{minutes:02d}m", f"{seconds:02d}s"] if hours else [f"{minutes}m", f"{seconds:02d}s"])
