"""
Save and load checkpoints.

A checkpoint for step S in <checkpoints_dir>/<tag>/ (tag like d20) is three kinds of file:
    model_S.pt              the model's state_dict (rank 0 writes it)
    optim_S_rank{r}.pt      what rank r needs to resume exactly: optimizer shards, RNG, loader position
    meta_S.json             model config, step, losses, user config (rank 0 writes it LAST)
Every file is written under a temporary name and renamed into place, so a crash mid-save never
damages an existing file, and a step only counts as saved once its meta_S.json exists.
"""
import glob
import json
import os
import re

import torch

from nanochat.common import get_base_dir, logger
from nanochat.gpt import GPT, GPTConfig

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


def _atomic_torch_save(obj, path):
    tmp_path = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp_path)
    os.replace(tmp_path, path)


def _atomic_json_save(obj, path):
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def _model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def _optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt")


def _meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Every rank calls this: each writes its own optimizer_data (if any); rank 0 also writes model and meta."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if optimizer_data is not None:
        _atomic_torch_save(optimizer_data, _optim_path(checkpoint_dir, step, rank))
    if rank == 0:
        _atomic_torch_save(model_data, _model_path(checkpoint_dir, step))
        _atomic_json_save(meta_data, _meta_path(checkpoint_dir, step))  # last: marks the step complete
        logger.info(f"saved checkpoint step {step} to {checkpoint_dir}")


def list_steps(checkpoint_dir):
    """Steps whose save completed (their meta file exists), ascending."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "meta_*.json")):
        match = re.fullmatch(r"meta_(\d+)\.json", os.path.basename(path))
        if match and os.path.exists(_model_path(checkpoint_dir, int(match.group(1)))):
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir):
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir}; train first (or check the --model-tag)")
    return steps[-1]


def list_tags(checkpoints_dir):
    if not os.path.isdir(checkpoints_dir):
        return []
    return sorted(d for d in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, d)))


def find_largest_model(checkpoints_dir):
    """The tag to load by default: the deepest dN tag, else the most recently written directory."""
    tags = list_tags(checkpoints_dir)
    if not tags:
        raise FileNotFoundError(f"no model tags in {checkpoints_dir}; the stage that writes it has not run yet")
    depth_tags = [(int(m.group(1)), tag) for tag in tags if (m := re.fullmatch(r"d(\d+)", tag))]
    if depth_tags:
        return max(depth_tags)[1]
    return max(tags, key=lambda tag: os.path.getmtime(os.path.join(checkpoints_dir, tag)))


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """-> (model_data, optimizer_data or None, meta_data); a clear error if the step was never saved."""
    steps = list_steps(checkpoint_dir)
    if step not in steps:
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {checkpoint_dir}; available steps: {steps or 'none'}")
    model_data = torch.load(_model_path(checkpoint_dir, step), map_location=device)
    optimizer_data = None
    if load_optimizer:
        optim_path = _optim_path(checkpoint_dir, step, rank)
        if not os.path.exists(optim_path):
            raise FileNotFoundError(f"{optim_path} is missing: step {step} was saved with a different number of ranks "
                                    f"or without optimizer state; resume with the same world size or from another step")
        optimizer_data = torch.load(optim_path, map_location=device, weights_only=False)
    with open(_meta_path(checkpoint_dir, step), encoding="utf-8") as f:
        meta_data = json.load(f)
    return model_data, optimizer_data, meta_data


def build_model(checkpoint_dir, step, device, phase):
    """Rebuild the GPT of a checkpoint on device. phase "train" or "eval". -> (model, tokenizer, meta)."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval' (got {phase!r})")
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    # checkpoints written from a torch.compile'd model carry this prefix
    model_data = {k.removeprefix("_orig_mod."): v.float() if v.is_floating_point() else v for k, v in model_data.items()}
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # rotary tables are not stored; the weights are overwritten next
    model.load_state_dict(model_data, strict=True, assign=True)
    model.train(phase == "train")
    from nanochat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the checkpoint in {checkpoint_dir} "
                         f"was trained with {config.vocab_size}; retrain one of them so they match")
    return model, tokenizer, meta


def most_advanced_source():
    """The latest stage of the pipeline that has a complete checkpoint: rl, then sft, mid, base."""
    for source in ("rl", "sft", "mid", "base"):
        checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[source])
        if any(list_steps(os.path.join(checkpoints_dir, tag)) for tag in list_tags(checkpoints_dir)):
            return source
    raise FileNotFoundError(f"no checkpoint of any stage in {get_base_dir()}; train a model first (bash speedrun.sh)")


def load_model(source, device, phase, model_tag=None, step=None):
    """Load the latest (or given) checkpoint of a stage: source in base / mid / sft / rl."""
    if source not in SOURCE_DIRS:
        raise ValueError(f"source must be one of {sorted(SOURCE_DIRS)} (got {source!r})")
    checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[source])
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"no model tag {model_tag!r} in {checkpoints_dir}; available tags: {list_tags(checkpoints_dir) or 'none'}")
    if step is None:
        step = find_last_step(checkpoint_dir)
    logger.info(f"loading {source} model {model_tag} step {step}")
    model, tokenizer, meta = build_model(checkpoint_dir, step, device, phase)
    meta = dict(meta, model_tag=model_tag, source=source)  # which checkpoint this was, for the next stage's logs
    return model, tokenizer, meta
