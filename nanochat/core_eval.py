"""
The CORE metric from the DCLM paper (https://arxiv.org/abs/2406.11794): 22 in-context-learning
tasks, each scored as accuracy, centered by its random baseline ((acc - baseline) / (1 - baseline)),
and averaged. Computed exactly as DCLM and the original nanochat do, so numbers are comparable
(GPT-2 1.5B scores 0.2565).

Why centered: the tasks have different chance levels (25% for 4-way multiple choice, 50% for
binary, ~0 for exact-match language modelling), so raw accuracies do not average fairly. Centering
maps chance to 0 and a perfect score to 1 on every task; a task below chance counts negative.

Why in-context tasks at all: a base model cannot follow instructions yet, but it can continue a
few-shot prompt, and comparing the model's own likelihood of each answer needs no generation and no
answer parsing. It measures what pretraining built, before any chat finetuning.

Three task types:
- multiple_choice: same context, several continuations; pick the choice with the lowest mean loss
  over its continuation tokens (the mean, not the sum, so a long answer is not penalised for length).
- schema: several contexts, same continuation; same scoring over the shared continuation
  (e.g. Winograd: which referent makes the rest of the sentence most likely).
- language_modeling: context then continuation; correct only if greedy decoding reproduces every
  continuation token.
"""
import csv
import json
import os
import random
import shutil
import socket
import tempfile
import time
import urllib.request
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.artifacts import atomic_write
from nanochat.common import get_base_dir, logger

# DCLM's task files and their metadata, as the original nanochat hosts them (downloaded once per base dir)
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# waits of 1, 2, 4, 8 s between the attempts
DOWNLOAD_RETRIES = 5

# -----------------------------------------------------------------------------
# The eval bundle: a zip with core.yaml, eval_meta_data.csv and eval_data/*.jsonl


def download_eval_bundle(url=EVAL_BUNDLE_URL, base_dir=None, retries=DOWNLOAD_RETRIES):
    """
    Make sure <base dir>/eval_bundle exists, downloading and unzipping it if not. Both the zip and
    the folder appear atomically (tmp + rename), so an interrupted run never leaves half a bundle.
    Call it from one rank only (base_eval does it on rank 0 then waits at a barrier).
    """
    base_dir = base_dir or get_base_dir()
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    if os.path.exists(os.path.join(bundle_dir, "core.yaml")):
        return bundle_dir
    zip_path = os.path.join(base_dir, "eval_bundle.zip")
    # a zip already there (copied by hand onto an offline machine, or left by an earlier try) is used as it is
    if not os.path.exists(zip_path):
        for attempt in range(1, retries + 1):
            try:
                logger.info(f"downloading {url} (attempt {attempt}/{retries})")
                with urllib.request.urlopen(url, timeout=60) as response, atomic_write(zip_path) as f:
                    shutil.copyfileobj(response, f, length=1 << 20)
                break
            except OSError as error:  # URLError, timeouts and connection resets are all OSErrors
                # a host name that does not resolve (EAI_NONAME: an offline box) will not resolve in 15 s
                # either; a temporary DNS failure is EAI_AGAIN and is retried like the rest
                unresolvable = getattr(getattr(error, "reason", None), "errno", None) == socket.EAI_NONAME
                if attempt == retries or unresolvable:
                    raise RuntimeError(
                        f"could not download the CORE eval bundle from {url} after {attempt} attempt(s): {error}\n"
                        f"Download it elsewhere and put it at {zip_path}, or unzip it into {bundle_dir}."
                    ) from error
                wait = 2 ** (attempt - 1)
                logger.warning(f"download failed ({error}); retrying in {wait} s")
                time.sleep(wait)
    # unzipped into a fresh directory on the same filesystem, then moved into place with one rename: a crash
    # mid-extraction leaves only that temporary directory, never an eval_bundle/ with half the task files
    unzip_dir = tempfile.mkdtemp(prefix="eval_bundle_unzip_", dir=base_dir)
    try:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                archive.extractall(unzip_dir)
        except zipfile.BadZipFile:
            os.remove(zip_path)  # so the next run downloads it again
            raise RuntimeError(f"{zip_path} was not a valid zip file; deleted it, run again to re-download") from None
        # the official zip holds a top-level eval_bundle/ folder; accept a flat zip too
        nested = os.path.join(unzip_dir, "eval_bundle")
        source = nested if os.path.isdir(nested) else unzip_dir
        if not os.path.exists(os.path.join(source, "core.yaml")):
            raise RuntimeError(f"{zip_path} has no core.yaml (neither at the top nor under eval_bundle/)")
        os.replace(source, bundle_dir)
    finally:
        shutil.rmtree(unzip_dir, ignore_errors=True)
    logger.info(f"eval bundle ready in {bundle_dir}")
    return bundle_dir


def load_core_tasks(bundle_dir):
    """[{label, task_type, dataset_uri, num_fewshot, continuation_delimiter, random_baseline}] from core.yaml + eval_meta_data.csv."""
    # imported here: only base_eval needs YAML, and no other module should pay for the import
    import yaml

    path = os.path.join(bundle_dir, "core.yaml")
    try:  # safe_load builds plain data only: a `!!python/object` tag in the file is an error, never a call
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a plain YAML file of tasks: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise ValueError(f"{path} must hold a mapping with a list under icl_tasks")
    baselines = {}
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"])
    tasks = []
    # core.yaml is in LLM Foundry's ICL format (the harness DCLM used); its fields are renamed to ours here
    for task in config["icl_tasks"]:
        if task["label"] not in baselines:
            raise ValueError(f"task {task['label']} has no row in eval_meta_data.csv")
        tasks.append({
            "label": task["label"],
            "task_type": task["icl_task_type"],
            "dataset_uri": task["dataset_uri"],
            # a list in the format (one run can try several shot counts); CORE fixes one per task
            "num_fewshot": task["num_fewshot"][0],
            "continuation_delimiter": task.get("continuation_delimiter", " "),
            "random_baseline": baselines[task["label"]],  # in percent
        })
    return tasks


def load_task_data(bundle_dir, task, max_per_task=-1):
    """The task's examples, shuffled with a fixed seed (the files are often sorted) and cut to max_per_task."""
    with open(os.path.join(bundle_dir, "eval_data", task["dataset_uri"]), encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    # a private Random: the global RNG is left alone, and every rank and every run gets the same order, so
    # --max-per-task evaluates the same examples everywhere
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data

# -----------------------------------------------------------------------------
# Prompts. Each few-shot example is followed by a blank line, as in DCLM's templates.


def render_prompts_mc(item, delimiter, fewshot_examples):
    """One prompt per choice: few-shot examples, then the query, then the choice."""
    # the few-shot examples are shown with their correct answers: they show the format and the kind of answer wanted
    prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot_examples)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, delimiter, fewshot_examples):
    """
    One prompt per context option, all ending in the same continuation. Winograd, for example: "The trophy does
    not fit in the suitcase because the trophy" / "... because the suitcase" + " is too big.": the right referent
    makes the shared ending more likely.
    """
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot_examples)
    return [f"{prefix}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]


def render_prompts_lm(item, delimiter, fewshot_examples):
    """[prompt without the continuation, prompt with it]."""
    prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot_examples)
    prompt_with = f"{prefix}{item['context'].strip()}{delimiter}{item['continuation']}"
    # strip: a trailing space in the prefix would be merged into the continuation's first token in
    # prompt_with, and then the prefix would not be a token-level prefix of it
    prompt_without = f"{prefix}{item['context'].strip()}{delimiter}".strip()
    return [prompt_without, prompt_with]


def find_common_length(token_sequences, direction="left"):
    """
    Length of the longest common prefix (left) or suffix (right) of the sequences. Found on the tokens, not the
    strings: where the shared text ends, BPE may merge its last characters with what follows differently in each row.
    """
    min_len = min(len(seq) for seq in token_sequences)
    indices = range(min_len) if direction == "left" else range(-1, -min_len - 1, -1)
    for i, idx in enumerate(indices):
        if any(seq[idx] != token_sequences[0][idx] for seq in token_sequences):
            return i
    return min_len


def tokenize_prompts(tokenizer, task_type, prompts):
    """-> (token lists, start, end): the scored span of row i is tokens[i][start[i]:end[i]]."""
    # BOS first, as every pretraining document starts: the model is scored in the position it was trained in
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    if task_type == "multiple_choice":  # the choices are what differs after the shared prefix
        # tokens every choice shares at its start (say a leading " the") are left out of all of them alike
        start = find_common_length(tokens, "left")
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task_type == "schema":  # the continuation is the shared suffix
        suffix = find_common_length(tokens, "right")
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    if task_type == "language_modeling":
        without, with_continuation = tokens
        if not (len(without) < len(with_continuation) and with_continuation[: len(without)] == without):
            raise ValueError("the language modelling prompt without its continuation is not a token prefix of the full prompt")
        return [with_continuation], [len(without)], [len(with_continuation)]
    raise ValueError(f"unknown icl_task_type {task_type!r}: expected multiple_choice, schema or language_modeling")


def crop_to_context(tokens, starts, ends, max_seq_len):
    """Drop tokens from the left of rows longer than the model's context, shifting the scored span."""
    if max_seq_len is None:
        return tokens, starts, ends
    # from the left: the scored span sits at the end of each row, so what is lost is the start of the few-shot context
    new_tokens, new_starts, new_ends = [], [], []
    for t, s, e in zip(tokens, starts, ends):
        crop = max(0, len(t) - max_seq_len)
        # at least one token must stay before the span: the first scored token is predicted from position s - 1
        if s - crop < 1:
            raise ValueError(f"a continuation of {e - s} tokens does not fit the model's context of {max_seq_len}")
        new_tokens.append(t[crop:])
        new_starts.append(s - crop)
        new_ends.append(e - crop)
    return new_tokens, new_starts, new_ends


@torch.no_grad()
def evaluate_example(model, tokenizer, data, idx, task, device, max_seq_len=None):
    """
    True if the model gets example data[idx] right. All of the example's prompts (one per choice or context)
    go through the model as one batch of rows: one forward pass per example.
    """
    item = data[idx]
    fewshot = []
    if task["num_fewshot"] > 0:
        # deterministic per example and independent of rank/world size: any run gives the same prompts
        rng = random.Random(1234 + idx)
        candidates = [i for i in range(len(data)) if i != idx]
        fewshot = [data[i] for i in rng.sample(candidates, min(task["num_fewshot"], len(candidates)))]
    render = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
              "language_modeling": render_prompts_lm}.get(task["task_type"])
    if render is None:
        raise ValueError(f"unknown icl_task_type {task['task_type']!r} in task {task['label']}")
    prompts = render(item, task["continuation_delimiter"], fewshot)
    tokens, starts, ends = tokenize_prompts(tokenizer, task["task_type"], prompts)
    tokens, starts, ends = crop_to_context(tokens, starts, ends, max_seq_len)

    pad = tokenizer.get_bos_token_id()  # padding sits after every scored span, so its value never matters
    # rows of different lengths in one [rows, T] batch, right-padded; attention is causal, so padding after a
    # row's end changes nothing at the positions that are scored
    input_ids = torch.full((len(tokens), max(len(t) for t in tokens)), pad, dtype=torch.long)
    for i, t in enumerate(tokens):
        input_ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    input_ids = input_ids.to(device)
    # [rows, T, vocab]; fp32 for the cross-entropy below, whatever dtype the model computed in
    logits = model(input_ids).float()
    # the logits at position p predict token p+1, so the span start..end-1 is scored at start-1..end-2
    if task["task_type"] == "language_modeling":
        s, e = starts[0], ends[0]
        # teacher forcing: each position sees the true tokens before it, so "greedy decoding reproduces the
        # continuation" is the same as "the argmax at every position is the true next token", in one pass
        predicted = logits[0, s - 1 : e - 1].argmax(dim=-1)
        return bool(torch.equal(predicted, input_ids[0, s:e]))
    mean_losses = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        loss = F.cross_entropy(logits[i, s - 1 : e - 1], input_ids[i, s:e], reduction="mean")
        mean_losses.append(loss.item())
    # the lowest mean loss is the most likely choice; on a tie the first choice wins (list.index)
    return mean_losses.index(min(mean_losses)) == item["gold"]


def evaluate_task(model, tokenizer, data, task, device, max_seq_len=None):
    """Accuracy on one task. Under torch.distributed each rank takes every world_size-th example."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    # one slot per example, 0 until its rank fills it: summing the ranks' vectors gathers every result
    # (each slot is written by exactly one rank), and the mean is over the whole task on every rank
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world_size):
        correct[idx] = float(evaluate_example(model, tokenizer, data, idx, task, device, max_seq_len))
    if world_size > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item() if len(data) else 0.0


def evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=-1, max_seq_len=None, log=print):
    """
    Run every task of the bundle. Returns {"results": {label: accuracy}, "centered_results":
    {label: centered accuracy}, "core_metric": mean centered accuracy}.
    """
    results, centered_results = {}, {}
    tasks = load_core_tasks(bundle_dir)
    for number, task in enumerate(tasks, 1):
        started = time.time()
        data = load_task_data(bundle_dir, task, max_per_task)
        accuracy = evaluate_task(model, tokenizer, data, task, device, max_seq_len)
        baseline = 0.01 * task["random_baseline"]  # the CSV gives it in percent
        results[task["label"]] = accuracy
        # chance -> 0, perfect -> 1 (the module docstring's "why centered")
        centered_results[task["label"]] = (accuracy - baseline) / (1.0 - baseline)
        log(f"[{number}/{len(tasks)}] {task['label']:<36} {task['num_fewshot']}-shot {task['task_type']:<18} "
            f"n={len(data):<5} accuracy {accuracy:.4f}  centered {centered_results[task['label']]:.4f}  "
            f"({time.time() - started:.1f} s)")
    # every task weighs the same, however many examples it has
    core_metric = sum(centered_results.values()) / len(centered_results)
    return {"results": results, "centered_results": centered_results, "core_metric": core_metric}
