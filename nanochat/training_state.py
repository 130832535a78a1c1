"""
Save and resume a training stage exactly: a run killed after step S and resumed from S takes the same next
steps, bit for bit, as the run that was never interrupted, on the same machine and thread count, when every
kernel it runs is deterministic: an eager CPU run, or any run with --deterministic (training_setup.py). A
compiled or GPU run without it resumes to within run-to-run noise, as a rerun would (tests/test_base_train.py
checks both).

Weights alone are not enough for that. The checkpoint of step S (nanochat/checkpoint_manager.py: the
files) also holds, per rank, every optimizer's state (momentum buffers, Adam moments: each rank its own
shard), the loader's position in its data (so no document is seen twice or skipped) and the RNG states;
the meta holds what the stage's logs and report carry on with (smoothed loss, training time, evals).
A resume checks that the model and the number of ranks are those that saved it, and says what to change
when they are not.
"""
import dataclasses

import torch

from nanochat.artifacts import DamagedArtifactError
from nanochat.checkpoint_manager import check_state_dict, find_last_step, list_whole_steps, load_checkpoint, save_checkpoint
from nanochat.common import print0


def save_training_state(checkpoint_dir, step, model, optimizers, loader, compute, meta):
    """
    Everything an exact resume needs at `step` (steps done). loader is None for a stage whose data position
    follows from the step alone (RL). meta: the stage's own figures; the step, model config and world size
    that a resume checks are added here.
    """
    # torch's global generators: whatever a stage draws from them after the resume continues the same sequence
    # as in the uninterrupted run
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(compute.device) if compute.device.type == "cuda" else None}
    # per rank, in that rank's shard: each rank has its own optimizer slice, its own place in the data and its
    # own generator state. Plain tensors, numbers, lists and dicts only, so it loads with weights_only=True.
    optimizer_data = {"optimizers": [opt.state_dict() for opt in optimizers],
                      "train_loader": loader.state_dict() if loader is not None else None, "rng": rng}
    # the model config is what a later stage rebuilds the model from (checkpoint_manager.build_model)
    meta = {"step": step, "model_config": dataclasses.asdict(model.config), "world_size": compute.world_size, **meta}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), optimizer_data, meta, rank=compute.rank)
    compute.barrier()  # nobody trains on while another rank's shard is still being written


def resume_if_asked(parser, args, checkpoint_dir, model, optimizers, compute, hint=""):
    """(start step, loader state, meta) from --resume-from-step when it was given, else a fresh start (0, None, {})."""
    if args.resume_from_step is None and getattr(args, "resume_if_saved", False):
        # an interrupted speedrun picks up where it stopped; a stage never run before starts fresh
        whole_steps = list_whole_steps(checkpoint_dir)  # a save cut short by the interruption is passed over
        if whole_steps:
            args.resume_from_step = whole_steps[-1]
        else:
            print0(f"no saved step in {checkpoint_dir}: starting fresh")
    # a fresh start: step 0, the loader from the beginning of its data, no figures carried over
    if args.resume_from_step is None:
        return 0, None, {}
    try:
        return resume_training_state(checkpoint_dir, args.resume_from_step, model, optimizers, compute)
    except (DamagedArtifactError, FileNotFoundError) as e:  # complete as they are: the hint is for a mismatched model
        parser.error(f"cannot resume: {e}")
    except ValueError as e:
        parser.error(f"cannot resume: {e}{hint}")


def resume_training_state(checkpoint_dir, resume_from_step, model, optimizers, compute):
    """
    Load weights, optimizer shards and RNG saved by save_training_state into model/optimizers.
    Returns (step, loader_state, meta). Raises ValueError/FileNotFoundError saying what to change.
    """
    step = find_last_step(checkpoint_dir) if resume_from_step == -1 else resume_from_step
    model_data, optimizer_data, meta = load_checkpoint(checkpoint_dir, step, compute.device, load_optimizer=True, rank=compute.rank,
                                                       required_meta_keys=("model_config",))
    # checked before loading anything: the run's flags built `model`, and a checkpoint of another shape would
    # otherwise fail deep inside load_state_dict with a list of tensor names
    if meta["model_config"] != dataclasses.asdict(model.config):
        raise ValueError(f"the checkpoint's model {meta['model_config']} differs from this one {dataclasses.asdict(model.config)}; "
                         f"resume with the same model flags and tokenizer")
    # the optimizer shards and the loader strides are per rank: another world size cannot continue them
    if meta.get("world_size", compute.world_size) != compute.world_size:
        raise ValueError(f"step {step} was saved by {meta['world_size']} ranks, this run has {compute.world_size}; "
                         f"resume with the same number of ranks")
    model.load_state_dict(check_state_dict(model, model_data, f"step {step}'s model file"), strict=True)
    shard = f"the optimizer shard of step {step} for rank {compute.rank}"
    try:  # a shard that parses but holds something else: one message, not a traceback from inside torch.optim
        if len(optimizer_data["optimizers"]) != len(optimizers):
            raise ValueError(f"{len(optimizer_data['optimizers'])} optimizers, this run has {len(optimizers)}")
        # in the order save_training_state wrote them, which is the order setup_optimizers returns them
        for opt, state in zip(optimizers, optimizer_data["optimizers"]):
            opt.load_state_dict(state)
        torch.set_rng_state(optimizer_data["rng"]["cpu"])
        if compute.device.type == "cuda" and optimizer_data["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(optimizer_data["rng"]["cuda"], compute.device)
        loader_state = optimizer_data["train_loader"]
        if loader_state is not None and not isinstance(loader_state, dict):
            raise ValueError(f"the loader state is a {type(loader_state).__name__}, not a dict")
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ValueError(f"{shard} does not hold this run's optimizer state ({type(e).__name__}: {e}); "
                         f"resume from another step or start the stage over") from None
    print0(f"resumed from step {step} of {checkpoint_dir}")
    return step, loader_state, meta
