"""
chat_eval: categorical scoring with a scripted model, pass@k through the real Engine, ChatCORE,
the distributed split of problems, and the base_eval / chat_eval scripts end to end on a tiny
checkpoint.
"""
import os
import subprocess
import sys

import pytest
import torch

from nanochat.task_eval import run_categorical_eval, run_generative_eval
from scripts.chat_eval import BASELINES, STAND_IN_TASKS, TASKS, chatcore
from tasks.arc import ARC
from tasks.common import Task
from tasks.mmlu import MMLU
from tests.conftest import write_tiny_checkpoints

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures")


class LetterPicker(torch.nn.Module):
    """
    At the last token of a known prompt, gives the chosen letter a high logit and an even higher
    one to a token that is not an allowed letter (which the eval must ignore). Everything else is flat.
    """

    def __init__(self, tokenizer, choices):
        super().__init__()
        self.vocab_size = tokenizer.get_vocab_size()
        self.distractor = tokenizer.encode("z")[0]
        self.answers = {}  # prompt tokens -> letter token
        for conversation, letter in choices:
            self.answers[tuple(tokenizer.render_for_completion(conversation))] = tokenizer.encode(letter)[0]
        self.batch_shapes = []

    def forward(self, idx):
        self.batch_shapes.append(tuple(idx.shape))
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.vocab_size)
        for b in range(idx.shape[0]):
            row = idx[b].tolist()
            for t in range(idx.shape[1]):
                letter = self.answers.get(tuple(row[: t + 1]))
                if letter is not None:
                    logits[b, t, letter] = 5.0
                    logits[b, t, self.distractor] = 10.0
        return logits


def right_answers_except(task, wrong_indices):
    """(conversation, letter) pairs: the right letter, except a different allowed letter at wrong_indices."""
    choices = []
    for i in range(len(task)):
        conversation = task[i]
        right = conversation["messages"][-1]["content"]
        wrong = next(letter for letter in conversation["letters"] if letter != right)
        choices.append((conversation, wrong if i in wrong_indices else right))
    return choices


def test_categorical_picks_the_highest_allowed_letter(tiny_tokenizer):
    mmlu = MMLU(subset="all", split="test", path=os.path.join(FIXTURES, "mmlu_test.jsonl"))
    model = LetterPicker(tiny_tokenizer, right_answers_except(mmlu, {3}))
    assert run_categorical_eval(mmlu, tiny_tokenizer, model, batch_size=2) == (4, 5)
    # batches of 2, 2, 1, padded to the longest prompt of each batch
    assert [shape[0] for shape in model.batch_shapes] == [2, 2, 1]
    assert run_categorical_eval(mmlu, tiny_tokenizer, model, batch_size=3, max_problems=3) == (3, 3)

    arc = ARC(subset="ARC-Easy", split="test", path=os.path.join(FIXTURES, "arc_easy_test.jsonl"))
    model = LetterPicker(tiny_tokenizer, right_answers_except(arc, {0, 2}))
    assert run_categorical_eval(arc, tiny_tokenizer, model, batch_size=8) == (1, 3)


class EchoTask(Task):
    """Two generative problems; a reply counts as right when it contains the problem's secret, and every reply is recorded."""

    def __init__(self, secret, **kwargs):
        super().__init__(**kwargs)
        self.secret, self.replies = secret, []

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return 2

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"say {index}"}, {"role": "assistant", "content": "ok"}]}

    def evaluate(self, conversation, assistant_response):
        self.replies.append(assistant_response)
        return int(self.secret(assistant_response))


def test_generative_pass_at_k_through_the_engine(tiny_tokenizer):
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, model_config_from_depth

    torch.manual_seed(0)
    model = GPT(model_config_from_depth(1, tiny_tokenizer.get_vocab_size(), 128))
    model.init_weights()
    model.eval()
    engine = Engine(model, tiny_tokenizer)
    quiet = lambda *args, **kwargs: None
    everything = EchoTask(lambda reply: True)
    correct = []
    assert run_generative_eval(everything, tiny_tokenizer, engine, 3, 6, 1.0, 50, log=quiet, correct_samples=correct) == (2, 2)
    assert len(everything.replies) == 6 and all(isinstance(r, str) for r in everything.replies)  # every sample is scored
    assert correct == [3, 3]
    nothing = EchoTask(lambda reply: False)
    assert run_generative_eval(nothing, tiny_tokenizer, engine, 3, 6, 1.0, 50, max_problems=1, log=quiet) == (0, 1)
    assert len(nothing.replies) == 3  # all k=3 samples of the one problem were tried


def test_chatcore_centers_by_random_baseline():
    accuracies = {"ARC-Easy": 0.25, "ARC-Challenge": 1.0, "MMLU": 0.625, "GSM8K": 0.5, "HumanEval": 0.0, "SpellingBee": 1.0}
    assert set(accuracies) == set(TASKS)
    # centered: 0, 1, 0.5, 0.5, 0, 1
    assert chatcore(accuracies) == pytest.approx(3.0 / 6)
    # the offline stand-ins have baselines too: WordNet-MC is 4-way, the others generative
    assert set(STAND_IN_TASKS) <= set(BASELINES)
    assert chatcore({"WordNet-MC": 0.25, "Arithmetic": 0.5, "SpellingBee": 1.0}) == pytest.approx(0.5)


def run_script(args, base_dir, nproc=1):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("NANOCHAT_DATA", None)  # these runs read the real tasks' schema from fixture files, not the stand-ins
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run(launcher + args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_chat_eval_script_under_torchrun(tiny_tokenizer, tmp_path):
    write_tiny_checkpoints(tiny_tokenizer, str(tmp_path), ["chatsft_checkpoints"])
    stdout = run_script(["-m", "scripts.chat_eval", "-i", "sft", "-a", "MMLU|GSM8K|SpellingBee", "--device-type", "cpu",
                         "--task-file", f"MMLU={FIXTURES}/mmlu_test.jsonl", "--task-file", f"GSM8K={FIXTURES}/gsm8k_test.jsonl",
                         "--max-problems", "3", "--max-new-tokens", "4", "--batch-size", "2"], tmp_path, nproc=2)
    # the two ranks' counts are summed: every task reports all 3 problems
    for name in ("MMLU", "GSM8K", "SpellingBee"):
        assert f"{name}: " in stdout and "/3 = " in stdout.split(f"{name}: ")[1].split("\n")[0]
    section = open(tmp_path / "report" / "chat-evaluation-sft.md").read()
    assert "- MMLU: " in section and "- Source: sft" in section


@pytest.mark.slow
def test_base_eval_script_under_torchrun_matches_single_process(tiny_tokenizer, tmp_path, monkeypatch):
    from nanochat.checkpoint_manager import load_model
    from nanochat.core_eval import evaluate_core
    from test_core_eval import write_bundle

    write_tiny_checkpoints(tiny_tokenizer, str(tmp_path), ["base_checkpoints"])
    bundle_dir = write_bundle(str(tmp_path))  # already in place: no download
    stdout = run_script(["-m", "scripts.base_eval", "--max-per-task", "3", "--device-type", "cpu"], tmp_path, nproc=2)
    assert "CORE metric: " in stdout
    rows = [row.split(",") for row in open(tmp_path / "base_eval" / "d1_5.csv").read().splitlines()]
    assert rows[0] == ["Task", "Accuracy", "Centered"] and [row[0] for row in rows[1:]] == ["tiny_mc", "tiny_schema", "tiny_lm", "CORE"]
    assert "- CORE: " in open(tmp_path / "report" / "base-model-evaluation.md").read()
    # the two ranks' split and all_reduce give what one process gets
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    model, tokenizer, _ = load_model("base", "cpu", phase="eval")
    out = evaluate_core(model, tokenizer, "cpu", bundle_dir, max_per_task=3, log=lambda *a, **k: None)
    assert [float(row[1]) for row in rows[1:4]] == pytest.approx(list(out["results"].values()), abs=1e-6)
    assert float(rows[4][2]) == pytest.approx(out["core_metric"], abs=1e-6)
