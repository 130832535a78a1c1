"""
Scoring a chat model on a task, shared by scripts/chat_eval.py and the periodic evals of SFT and RL.

Categorical tasks (multiple choice) need one batched forward pass: the answer is whichever allowed
letter has the highest logit right after <|assistant_start|>, so a model is never penalised for the
words around its answer. Generative tasks sample replies through the Engine (with tool use) and count
a problem as solved if any of the num_samples replies is right (pass@k). Problems are strided across
ranks; all_reduce_counts sums the (passed, total) pairs (all_reduce_sums any figures).

What a categorical problem looks like to the model (tasks/common.py render_mc), and the one position read:

    <|bos|><|user_start|>Multiple Choice question: What is the capital of France?
    - Berlin=A
    - Paris=B
    ...
    Respond only with the letter of the correct answer.<|user_end|><|assistant_start|>   <- logits of A, B, C, D here
"""
import time

import torch
import torch.distributed as dist

from nanochat.common import get_dist_info, print0


def letter_token_ids(tokenizer, letters, cache):
    """
    The single token id of each answer letter (the categorical eval compares exactly these logits).
    Encoded without a leading space: in the rendered prompt the answer follows <|assistant_start|> directly.
    cache: a dict kept by the caller across batches, so each letter is encoded once per eval.
    """
    ids = []
    for letter in letters:
        if letter not in cache:
            encoded = tokenizer.encode(letter)
            if len(encoded) != 1:
                raise ValueError(f"answer letter {letter!r} is {len(encoded)} tokens in this tokenizer; categorical eval needs one")
            cache[letter] = encoded[0]
        ids.append(cache[letter])
    return ids


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model, batch_size, max_problems=None, device="cpu"):
    """(num_passed, total) over this rank's share of the problems; batches are strided across ranks."""
    _, rank, _, world_size = get_dist_info()
    num_problems = len(task) if max_problems is None else min(len(task), max_problems)
    # ceil(num_problems / batch_size): the last batch may be short
    num_batches = -(-num_problems // batch_size)
    pad = tokenizer.get_bos_token_id()  # right padding: it comes after every answer position, so it is never read
    letter_cache = {}
    num_passed, total = 0, 0
    # whole batches are strided across ranks (not single problems), so each rank's forward passes stay full
    for batch_index in range(rank, num_batches, world_size):
        conversations = [task[i] for i in range(batch_index * batch_size, min((batch_index + 1) * batch_size, num_problems))]
        prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
        max_length = max(len(ids) for ids in prompts)
        inputs = torch.tensor([ids + [pad] * (max_length - len(ids)) for ids in prompts], dtype=torch.long, device=device)
        # [rows, max_length, vocab]; only one position per row is read below
        logits = model(inputs)
        for row, (conversation, ids) in enumerate(zip(conversations, prompts)):
            # the letters this problem allows (A-D for 4 choices): the argmax is over them only, so a model that
            # would rather say "The" still gets scored on which letter it prefers
            letters = conversation["letters"]
            # the logits at the last prompt token (<|assistant_start|>) predict the first answer token
            letter_logits = logits[row, len(ids) - 1, letter_token_ids(tokenizer, letters, letter_cache)]
            predicted = letters[letter_logits.argmax().item()]
            num_passed += int(task.evaluate(conversation, predicted))
            total += 1
    return num_passed, total


def score_samples(task, tokenizer, engine, index, num_samples, max_new_tokens, temperature, top_k):
    """0/1 for each of num_samples replies to problem `index` (seeded by the index: the same on any rank)."""
    conversation = task[index]
    prompt = tokenizer.render_for_completion(conversation)
    # the num_samples rows share one prefill of the prompt and then sample independently
    results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                       temperature=temperature, top_k=top_k, seed=index)
    # each task parses its own answer out of the reply text (GSM8K: the number after ####, ...)
    return [int(task.evaluate(conversation, tokenizer.decode(result[len(prompt):]))) for result in results]


def run_generative_eval(task, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k, max_problems=None, log=print0,
                        correct_samples=None):
    """
    (num_passed, total) over this rank's share (problems strided across ranks); passed = any sample right (pass@k).
    correct_samples, a list, receives the number of right samples of each problem (RL's pass@1 estimate).
    """
    _, rank, _, world_size = get_dist_info()
    num_problems = len(task) if max_problems is None else min(len(task), max_problems)
    num_passed, total = 0, 0
    started = time.time()
    for i in range(rank, num_problems, world_size):
        scores = score_samples(task, tokenizer, engine, i, num_samples, max_new_tokens, temperature, top_k)
        # pass@k: solved if any of the k samples is right (an upper bound on what one reply would score)
        num_passed += int(any(scores))
        total += 1
        if correct_samples is not None:
            correct_samples.append(sum(scores))
        if total % 10 == 0 or i + world_size >= num_problems:
            # progress of the whole eval, estimated from this rank's position: problems are strided, so when rank r
            # is at problem i the others are near it
            done = min(num_problems, i + 1)
            eta = (time.time() - started) / done * (num_problems - done)
            log(f"\r  {done}/{num_problems} passed {num_passed}/{total} on rank {rank} ({100 * num_passed / total:.1f}%), ETA {eta:.0f} s", end="")
    log("")
    return num_passed, total


def all_reduce_sums(values, device):
    """Each of `values` summed over ranks, in one all-reduce (float64: counts stay exact up to 2**53)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals.tolist()


def all_reduce_counts(num_passed, total, device):
    """Sum (passed, total) over ranks."""
    return tuple(int(count) for count in all_reduce_sums([num_passed, total], device))


def turn_end_rate(engine, tokenizer, conversations, max_tokens=128):
    """
    (ended, total) over this rank's share of the prompts: how many greedy replies close their turn with
    <|assistant_end|> within max_tokens. A chat model should; a base model, never taught the format, rambles on.
    """
    _, rank, _, world_size = get_dist_info()
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    ended, total = 0, 0
    for i in range(rank, len(conversations), world_size):
        prompt = tokenizer.render_for_completion(conversations[i])
        # greedy (temperature 0): the figure measures the model, not the luck of a sample.
        # generate yields one column of tokens per step, one per sample: [0] is our only sample
        for token_column, _ in engine.generate(prompt, num_samples=1, max_tokens=max_tokens, temperature=0.0):
            if token_column[0] == assistant_end:
                ended += 1
                break
        total += 1
    return ended, total
