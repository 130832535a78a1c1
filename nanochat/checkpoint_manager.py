"""
Save and load checkpoints.

A checkpoint for step S in <checkpoints_dir>/<tag>/ (tag like d20) is three kinds of file:
    model_S.pt              the model's state_dict (rank 0 writes it)
    optim_S_rank{r}.pt      what rank r needs to resume exactly: optimizer shards, RNG, loader position
    optim_S_rank{r}.pt.json the size and sha256 of rank r's shard (rank r writes it, right after the shard)
    meta_S.json             model config, step, losses, user config, and under "files" the size and
                            sha256 of model_S.pt (rank 0 writes it LAST)
Every file is written under a temporary name and renamed into place, so a crash mid-save never
damages an existing file, and a step only counts as saved once its meta_S.json exists.

Loading checks each file against its record before reading it (nanochat/artifacts.py), so a truncated
or corrupted file is reported by name, with the steps whose files are still whole. Every .pt file is read
with torch.load(weights_only=True): tensors, numbers, strings, lists and dicts only. A record is a checksum,
not a signature (whoever can write the file can write its record), so what keeps a planted file from running
code is that nothing but plain data is ever unpickled; everything an exact resume needs (optimizer state,
RNG states, the loader's position) is kept in those types. Why the shards keep
their records in their own small files: ranks do not talk to each other while saving, so rank 0 cannot
know the checksum of another rank's shard when it writes the meta; each rank records what it wrote.
Checkpoints saved before records existed have none, and still load.
"""
import glob
import json
import os
import re

import torch

from nanochat.artifacts import DamagedArtifactError, atomic_write, load_checked, looks_whole, read_json, read_sidecar, write_recorded
from nanochat.common import get_base_dir, logger
from nanochat.gpt import GPT, GPTConfig

# where each stage of the pipeline keeps its checkpoints, under the base dir; each holds one folder per model tag
SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


def _atomic_json_save(obj, path):
    # indented: a meta is also read by people, to see what a run was trained with
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def _model_path(checkpoint_dir, step):
    # steps zero-padded to 6 digits: the files of a directory list in step order
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def _optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt")


def _meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Every rank calls this: each writes its own optimizer_data (if any); rank 0 also writes model and meta."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    # Optimizer state is sharded (DistMuon/DistAdamW keep moments only for what each rank owns), so every rank
    # must write its own. The weights are identical on every rank after each step, so one copy is enough.
    if optimizer_data is not None:
        write_recorded(_optim_path(checkpoint_dir, step, rank), lambda f: torch.save(optimizer_data, f), record_beside=True)
    if rank == 0:
        model_path = _model_path(checkpoint_dir, step)
        # the record goes in the meta, not beside the model: the meta is written last, so a step that counts as
        # saved always has its model's record
        model_record = write_recorded(model_path, lambda f: torch.save(model_data, f))
        meta_data = dict(meta_data, files={os.path.basename(model_path): model_record})
        # last: the meta's existence is what marks the step complete (list_steps)
        _atomic_json_save(meta_data, _meta_path(checkpoint_dir, step))
        logger.info(f"saved checkpoint step {step} to {checkpoint_dir}")


def list_steps(checkpoint_dir):
    """Steps whose save completed (their meta file exists), ascending. A listed step may still turn out damaged."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "meta_*.json")):
        # fullmatch: a stray file like meta_old.json is not a step
        match = re.fullmatch(r"meta_(\d+)\.json", os.path.basename(path))
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def list_whole_steps(checkpoint_dir):
    """
    Steps whose files all look whole: the meta parses, and the model and every optimizer shard exist with
    their recorded sizes. Sizes only, no hashing: this runs on the error path over every step, and hashing
    them all would take minutes for big models, while a wrong size is how most damage shows (a full disk,
    an interrupted copy).
    """
    whole = []
    for step in list_steps(checkpoint_dir):
        model_path = _model_path(checkpoint_dir, step)
        # however many ranks saved this step: each shard is checked against its own record
        shards = glob.glob(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank*.pt"))
        try:
            model_record = read_json(_meta_path(checkpoint_dir, step)).get("files", {}).get(os.path.basename(model_path))
            if looks_whole(model_path, model_record) and all(looks_whole(shard, read_sidecar(shard)) for shard in shards):
                whole.append(step)
        except DamagedArtifactError:  # a meta or a shard's record that does not parse
            continue
    return whole


def _damage_remedy(checkpoint_dir, step):
    """What to do about a damaged step: the other steps whose files are whole, or rerunning the stage."""
    others = [s for s in list_whole_steps(checkpoint_dir) if s != step]
    if not others:
        return f"no other step in {checkpoint_dir} is whole: rerun the stage that wrote it"
    return (f"rerun the stage that wrote it, or pick another step (--step, or --resume-from-step when resuming); "
            f"steps in {checkpoint_dir} whose files are whole: {others}")


def find_last_step(checkpoint_dir):
    """The highest step whose save completed (its meta exists); FileNotFoundError when there is none."""
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir}; train first (or check the --model-tag)")
    return steps[-1]


def list_tags(checkpoints_dir):
    """The model tags (subfolders, e.g. d20) of a stage's checkpoints folder, sorted; [] when it does not exist."""
    if not os.path.isdir(checkpoints_dir):
        return []
    return sorted(d for d in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, d)))


def find_largest_model(checkpoints_dir):
    """The tag to load by default: the deepest dN tag, else the most recently written directory."""
    tags = list_tags(checkpoints_dir)
    if not tags:
        raise FileNotFoundError(f"no model tags in {checkpoints_dir}; the stage that writes it has not run yet")
    # compared as numbers: as strings "d4" > "d20"
    depth_tags = [(int(m.group(1)), tag) for tag in tags if (m := re.fullmatch(r"d(\d+)", tag))]
    if depth_tags:
        return max(depth_tags)[1]
    return max(tags, key=lambda tag: os.path.getmtime(os.path.join(checkpoints_dir, tag)))


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0, required_meta_keys=()):
    """
    -> (model_data, optimizer_data or None, meta_data). Every file is checked against its record first;
    a step never saved raises FileNotFoundError, a damaged one DamagedArtifactError saying what to do.
    """
    steps = list_steps(checkpoint_dir)
    if step not in steps:
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {checkpoint_dir}; available steps: {steps or 'none'}")
    optim_path = _optim_path(checkpoint_dir, step, rank)
    # a shard is per rank: resuming with another world size would hand rank r a slice it does not own
    if load_optimizer and not os.path.exists(optim_path):
        resumable = [s for s in list_whole_steps(checkpoint_dir) if os.path.exists(_optim_path(checkpoint_dir, s, rank))]
        raise FileNotFoundError(f"{optim_path} is missing: step {step} was saved with a different number of ranks "
                                f"or without optimizer state; resume with the same world size or from another step "
                                f"(steps whose files are whole, with a shard for rank {rank}: {resumable or 'none'})")
    try:
        # the meta first: it holds the model's record
        meta_data = read_json(_meta_path(checkpoint_dir, step), required_keys=required_meta_keys)
        # bookkeeping of this module, not part of what the stage saved; absent in checkpoints saved before records
        # existed, whose model file is then loaded unchecked (records.get gives None)
        records = meta_data.pop("files", {})
        model_path = _model_path(checkpoint_dir, step)
        model_data = load_checked(model_path, records.get(os.path.basename(model_path)),
                                  lambda path: torch.load(path, map_location=device, weights_only=True))
        optimizer_data = None
        if load_optimizer:
            optimizer_data = load_checked(optim_path, read_sidecar(optim_path),
                                          lambda path: torch.load(path, map_location=device, weights_only=True))
    except DamagedArtifactError as e:
        raise DamagedArtifactError(f"{e}; {_damage_remedy(checkpoint_dir, step)}") from None
    return model_data, optimizer_data, meta_data


# What a checkpoint's model_config may ask for, checked before anything is built from it: far above any model this
# repo trains (depth 32 is ~1.9B parameters), low enough that a damaged or hostile meta cannot ask for terabytes
# (vocab 10**12) or hang while a million layers are built. sequence_len bounds the rotary table (10x it is built).
MODEL_CONFIG_BOUNDS = {"sequence_len": (1, 65536), "vocab_size": (1, 2**21), "n_layer": (1, 256), "n_head": (1, 1024),
                       "n_kv_head": (1, 1024), "n_embd": (1, 65536)}
MODEL_CONFIG_FLAGS = ("x0_mixing", "value_embeds")  # booleans; a meta written before a flag existed lacks it: off


def model_config_from_meta(model_config, meta_path):
    """The GPTConfig a meta's model_config describes, or ValueError listing every way it is not one we can build."""
    if not isinstance(model_config, dict):
        raise ValueError(f"{meta_path}: model_config must be an object, found {type(model_config).__name__}")
    # every problem is collected before raising: one message lists them all, not one per attempt
    problems = [f"unknown key {key!r}" for key in model_config if key not in MODEL_CONFIG_BOUNDS and key not in MODEL_CONFIG_FLAGS]
    for key, (low, high) in MODEL_CONFIG_BOUNDS.items():
        value = model_config.get(key)
        # type(), not isinstance: a bool is an int, and True layers is no depth
        if type(value) is not int or not low <= value <= high:
            problems.append(f"{key} must be an integer from {low} to {high:,} (found {value!r})")
    problems += [f"{flag} must be true or false (found {model_config[flag]!r})"
                 for flag in MODEL_CONFIG_FLAGS if flag in model_config and not isinstance(model_config[flag], bool)]
    if not problems:
        n_embd, n_head, n_kv_head = model_config["n_embd"], model_config["n_head"], model_config["n_kv_head"]
        if n_embd % n_head or (n_embd // n_head) % 2:
            problems.append(f"n_embd {n_embd} must split into n_head {n_head} heads of an even width (rotary pairs channels)")
        # grouped-query attention: each kv head serves n_head / n_kv_head query heads
        if n_head % n_kv_head:
            problems.append(f"n_kv_head {n_kv_head} must divide n_head {n_head}")
    if problems:
        raise ValueError(f"{meta_path} does not describe a model this code can build: {'; '.join(problems)}")
    return GPTConfig(**model_config)


def check_state_dict(model, model_data, path):
    """Every tensor the model needs, with its shape, and nothing else: one message listing what differs."""
    if not isinstance(model_data, dict):
        raise ValueError(f"{path} holds a {type(model_data).__name__}, not a model's state dict")
    # a state dict saved from a torch.compile wrapper names every tensor "_orig_mod.<name>"
    found = {str(name).removeprefix("_orig_mod."): value for name, value in model_data.items()}
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    problems = [f"missing {name}" for name in expected if name not in found]
    problems += [f"unexpected {name}" for name in found if name not in expected]
    problems += [f"{name} is {type(value).__name__ if not torch.is_tensor(value) else tuple(value.shape)}, expected {expected[name]}"
                 for name, value in found.items() if name in expected and (not torch.is_tensor(value) or tuple(value.shape) != expected[name])]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ValueError(f"{path} does not match the model its meta describes: {shown}")
    return found


def build_model(checkpoint_dir, step, device, phase):
    """Rebuild the GPT of a checkpoint on device. phase "train" or "eval". -> (model, tokenizer, meta)."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval' (got {phase!r})")
    from nanochat.tokenizer import get_tokenizer
    # first: a missing or damaged tokenizer is reported before seconds of building the model
    tokenizer = get_tokenizer()
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device, required_meta_keys=("model_config",))
    config = model_config_from_meta(meta["model_config"], _meta_path(checkpoint_dir, step))
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the checkpoint in {checkpoint_dir} "
                         f"was trained with {config.vocab_size}; retrain one of them so they match")
    # build on the meta device (shapes only), then allocate once on the target device: no throwaway
    # random init in CPU memory for a model that is about to be overwritten, and no allocation at all before
    # the file's tensors are known to have the shapes the config implies
    with torch.device("meta"):
        model = GPT(config)
    # the model on the meta device knows every tensor's shape without holding any memory: the file is checked
    # against it
    model_data = check_state_dict(model, model_data, _model_path(checkpoint_dir, step))
    # fp32 weights whatever was saved, as training expects; the chat front ends cast to bf16 themselves
    # (engine.prepare_for_inference)
    model_data = {k: v.float() if v.is_floating_point() else v for k, v in model_data.items()}
    # to_empty allocates uninitialised memory; init_weights fills it, which matters for the rotary tables (buffers
    # that are not saved); the weights it draws are overwritten next
    model.to_empty(device=device)
    model.init_weights()
    # assign=True: the loaded tensors become the parameters, instead of being copied into the fresh ones
    model.load_state_dict(model_data, strict=True, assign=True)
    model.train(phase == "train")
    return model, tokenizer, meta


def most_advanced_source():
    """The latest stage of the pipeline that has a complete checkpoint: rl, then sft, mid, base."""
    # the pipeline order reversed: chat_cli and chat_web talk to the most finished model there is by default
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
    # the defaults pick what a user most likely means: the biggest model of the stage, at its last step
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
