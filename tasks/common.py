"""
What every task shares: the Task base class, mixtures and sequences of tasks, the multiple-choice
prompt format, and the loader that reads a dataset from the Hugging Face hub or from a local file.

A task is a list of conversations. A conversation is a dict with a "messages" list (see
nanochat/tokenizer.py for how it is rendered) plus whatever the task's evaluate() needs.
"""
import gzip
import json
import operator
import os
import random


class Task:
    """
    Base class of every dataset of conversations. Subclasses set eval_type and implement
    get_example(index) and evaluate() (and num_examples() when they keep no self.rows).
    start/stop/step take a slice of the task without copying anything, e.g. Task(start=0, stop=1000)
    for a quick eval, or Task(start=rank, step=world_size) to shard it across ranks.
    """

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}: need 0 <= start <= stop and step >= 1")
        self.start, self.stop, self.step = start, stop, step

    # 'categorical' (pick one of the allowed letters) or 'generative' (sample a free-form reply)
    eval_type = None

    def num_examples(self):
        return len(self.rows)  # hub-backed tasks keep their rows; synthetic ones override this

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, assistant_response):
        """1 if assistant_response answers the conversation correctly, else 0."""
        raise NotImplementedError

    def reward(self, conversation, assistant_response):
        """The RL reward for a sampled reply; by default just the eval outcome."""
        return float(self.evaluate(conversation, assistant_response))

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, index):
        index = operator.index(index)  # ints and numpy ints; a float or a slice is a TypeError
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a task of length {len(self)}")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]


class TaskMixture:
    """
    Several tasks shuffled together into one deterministic stream (same seed, same order on every
    rank and every run). To oversample a task, list it twice.
    """

    def __init__(self, tasks, seed=42):
        self.tasks = tasks
        self.index_map = [(task_index, i) for task_index, task in enumerate(tasks) for i in range(len(task))]
        # shuffled, not concatenated: every batch mixes the tasks, so no stretch of training sees only one
        # of them (and the last steps, at the lowest lr, do not specialise in whichever task came last)
        random.Random(seed).shuffle(self.index_map)

    def __len__(self):
        return len(self.index_map)

    def __getitem__(self, index):
        task_index, example_index = self.index_map[index]
        return self.tasks[task_index][example_index]


class TaskSequence:
    """Several tasks one after the other, in order (a curriculum)."""

    def __init__(self, tasks):
        self.tasks = tasks
        self.lengths = [len(task) for task in tasks]

    def __len__(self):
        return sum(self.lengths)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a sequence of length {len(self)}")
        for task, length in zip(self.tasks, self.lengths):
            if index < length:
                return task[index]
            index -= length


def render_mc(question, letters, choices):
    """
    The multiple-choice prompt. The letter comes *after* each choice ("- Paris=A") so that a small
    model has seen the choice before it has to attach a letter to it, and the letter is a single
    token that the categorical eval can read off the logits.
    """
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    query += "\nRespond only with the letter of the correct answer."
    return query


def read_local_rows(path):
    """Rows (dicts) of a local .parquet, .jsonl, .jsonl.gz, .json or .json.gz file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset file {path} does not exist; pass path= a .parquet or .jsonl file in the hub schema")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    opener = gzip.open if path.endswith(".gz") else open
    stem = path[:-3] if path.endswith(".gz") else path
    with opener(path, "rt", encoding="utf-8") as f:
        if stem.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        if stem.endswith(".json"):
            rows = json.load(f)
            if not isinstance(rows, list):
                raise ValueError(f"{path} must hold a JSON list of rows")
            return rows
    raise ValueError(f"don't know how to read {path}: use a .parquet, .jsonl(.gz) or .json(.gz) file")


def use_stand_ins():
    """
    NANOCHAT_DATA=sample (the CPU profile, the tests, any offline machine) swaps the hub's chat data sets for
    the offline stand-ins (arithmetic.py, wikiqa.py, wordnet_mc.py, chatterbot.py, the identity and
    spelling tasks); the scripts label every stand-in score as such.
    """
    return os.environ.get("NANOCHAT_DATA", "").lower() == "sample"


def load_hub_dataset(hub_name, config, split, path=None):
    """
    The rows of a dataset: from a local file in the hub's own schema when path= is given (how
    tests and offline machines run), else from the Hugging Face hub via the datasets library.
    Either way the result supports len() and [index] -> row dict.
    """
    if path is not None:
        return read_local_rows(path)
    from datasets import load_dataset

    try:
        return load_dataset(hub_name, config, split=split)
    except Exception as error:  # no network, hub down, offline mode...: all end the same way for the user
        raise RuntimeError(
            f"could not load {hub_name} (config={config}, split={split}) from the Hugging Face hub: {error}\n"
            f"If this machine cannot reach the hub, set NANOCHAT_DATA=sample to train and evaluate on the offline "
            f"stand-ins, or download the split elsewhere and pass path=<file.parquet|file.jsonl> to the task."
        ) from error


def shuffled(rows, seed=42):
    """
    rows in a fixed pseudo-random order, so that taking the first N (e.g. --max-problems) is a fair
    sample. The same permutation is used for hub datasets and local files.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if hasattr(rows, "select"):  # a datasets.Dataset: lazy index mapping, no copy
        return rows.select(order)
    return [rows[i] for i in order]
