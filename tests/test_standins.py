"""The offline stand-in tasks: Arithmetic, ChatterbotConversations, WikipediaQA, WordNetMC."""
import collections
import importlib.util
import os
import re

import pytest

from tasks.arithmetic import Arithmetic
from tasks.chatterbot import ChatterbotConversations
from nanochat.sample_corpus import document_source, sample_documents
from tasks.wikiqa import WikipediaQA, sentences, summary_subject
from tasks.wordnet_mc import WordNetMC

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST = 200  # examples per split that every check walks through


@pytest.fixture(scope="module")
def wikiqa():
    return WikipediaQA("train"), WikipediaQA("test")


@pytest.fixture(scope="module")
def wordnet_mc():
    return WordNetMC("train"), WordNetMC("test")


@pytest.fixture(scope="module")
def chatterbot():
    return ChatterbotConversations("train"), ChatterbotConversations("test")


def first_examples(task, n=FIRST):
    return [task[i] for i in range(min(n, len(task)))]


def assert_renders(task, tokenizer):
    """Every one of the first examples renders, teaches the model something, and alternates user/assistant."""
    for example in first_examples(task):
        ids, mask = tokenizer.render_conversation(example)
        assert len(ids) == len(mask) and sum(mask) > 0
        roles = [message["role"] for message in example["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) >= 2


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_chat_standins", os.path.join(REPO_ROOT, "dev", "build_chat_standins.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task_class", [Arithmetic, ChatterbotConversations, WikipediaQA, WordNetMC])
def test_bad_split_is_a_clear_error(task_class):
    with pytest.raises(ValueError, match="split must be train or test"):
        task_class(split="validation")


# ---------------------------------------------------------------------------- Arithmetic


def test_arithmetic_renders_with_correct_calculator_calls(tiny_tokenizer):
    for split in ("train", "test"):
        task = Arithmetic(split, size=FIRST)
        assert task.eval_type == "generative" and len(task) == FIRST
        assert_renders(task, tiny_tokenizer)
        for example in task:
            parts = example["messages"][1]["content"]
            types = [part["type"] for part in parts]
            assert all(types[i + 1] == "python_output" for i, kind in enumerate(types) if kind == "python")
            calls = [(part["text"], parts[i + 1]["text"]) for i, part in enumerate(parts) if part["type"] == "python"]
            assert 1 <= len(calls) <= 3
            for expression, result in calls:
                assert re.fullmatch(r"\d+(?:[-+*/]\d+)+", expression), expression  # a plain literal: safe to eval
                assert eval(expression) == int(result), (expression, result)
            final = parts[-1]["text"]
            assert final.endswith(f"\n#### {calls[-1][1]}")  # the answer is the last computed result
            assert task.evaluate(example, f"#### {calls[-1][1]}") == 1
            assert task.evaluate(example, f"#### {int(calls[-1][1]) + 1}") == 0
            assert task.reward(example, f"so #### {calls[-1][1]}") == 1.0


def test_arithmetic_is_deterministic_varied_and_splits_share_no_question():
    train, test = Arithmetic("train", size=5000), Arithmetic("test", size=500)
    train_questions = {example["messages"][0]["content"] for example in train}
    test_questions = [example["messages"][0]["content"] for example in test]
    assert not train_questions & set(test_questions)
    assert len(set(test_questions)) > 450  # not a handful of problems repeated
    for kind in ("each", "equally", "per hour", "years old", "pages", "Tickets", "weeks", "half"):  # shopping, sharing, rates...
        assert any(kind in question for question in test_questions), kind
    assert Arithmetic("train")[123] == train[123] and Arithmetic("test", size=5)[4] == test[4]
    assert train[0] != test[0]
    numbers = [int(n) for q in test_questions for n in re.findall(r"\d+", q)]
    assert sum(n <= 100 for n in numbers) / len(numbers) > 0.8  # operands mostly 1-100


# ---------------------------------------------------------------------------- ChatterbotConversations


def test_chatterbot_conversations_render_and_split_by_prompt(chatterbot, tiny_tokenizer):
    train, test = chatterbot
    assert len(train) > 800 and len(test) > 50 and train.eval_type == "generative"
    for task in (train, test):
        assert_renders(task, tiny_tokenizer)
    assert not {c["messages"][0]["content"] for c in train} & {c["messages"][0]["content"] for c in test}
    everything = list(train) + list(test)
    assert max(len(c["messages"]) for c in everything) >= 4  # some real multi-turn dialogues
    assert len({c["category"] for c in everything}) >= 15
    assert len({repr(c["messages"]) for c in everything}) == len(everything)  # duplicates were removed
    example = test[0]
    assert test.evaluate(example, "  " + example["messages"][-1]["content"] + "\n") == 1
    assert test.evaluate(example, "Something else entirely.") == 0
    assert ChatterbotConversations("test")[3] == test[3]


def test_chatterbot_build_turns_dialogues_into_alternating_conversations():
    build = load_build_script()
    odd = build.dialogue_to_conversations(["Hi", "Hello", "How are you?"], alternative_replies=False)
    assert odd == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    alternatives = build.dialogue_to_conversations(["Are you sad", "No.", "Should I be?"], alternative_replies=True)
    assert [c[1]["content"] for c in alternatives] == ["No.", "Should I be?"]
    assert all(c[0] == {"role": "user", "content": "Are you sad"} for c in alternatives)
    files = {"a.yml": {"categories": ["greetings"], "conversations": [["Hi", "Hello"], ["Hi", "Hello"], "not a list", ["Yes"]]}}
    rows, skipped = build.build_conversations(files)
    assert rows == [{"messages": odd[0], "category": "greetings"}] and skipped == 2


# ---------------------------------------------------------------------------- WikipediaQA


def test_wikiqa_subject_and_sentence_heuristics():
    assert summary_subject("In computing, a database is an organized collection of data.") == ("a", "database", "is")
    assert summary_subject("The Dead Sea, also known by other names, is a landlocked salt lake.") == ("the", "Dead Sea", "is")
    seaweed = "Seaweed, or macroalgae, refers to thousands of species of marine algae. Some seaweed is eaten."
    assert summary_subject(seaweed) == (None, "seaweed", "is")
    assert summary_subject("Catfish are a diverse group of ray-finned fish.")[1:] == ("Catfish", "are")
    assert summary_subject("Nazi Germany built and operated a system of concentration camps.") is None
    assert summary_subject("In geometry, a binary operation is commutative if the order does not matter.") is None
    assert sentences("Mr. Smith moved to St. Louis in 1990. He met M. C. Escher there! Then he left.") == [
        "Mr. Smith moved to St. Louis in 1990.", "He met M. C. Escher there!", "Then he left."]


def test_wikiqa_answers_open_real_summaries_and_splits_share_no_subject(wikiqa, tiny_tokenizer):
    train, test = wikiqa
    assert len(train) > 7000 and len(test) > 500 and train.eval_type == "generative"
    for task in (train, test):
        assert_renders(task, tiny_tokenizer)
    assert not {e["subject"].lower() for e in train} & {e["subject"].lower() for e in test}
    summaries = {"train": [t for t in sample_documents("train") if document_source(t) == "wikipedia"],
                 "test": [t for t in sample_documents("val") if document_source(t) == "wikipedia"]}
    for split, task in (("train", train), ("test", test)):
        by_opening = {text[:40]: text for text in summaries[split]}
        for example in first_examples(task, 100):
            question, answer = (m["content"] for m in example["messages"])
            assert len(answer) <= 400 and by_opening[answer[:40]].startswith(answer)  # the opening of a real summary
            assert example["subject"] in question
    assert WikipediaQA("test")[5] == test[5]


def test_wikiqa_evaluate_rewards_the_reference_and_close_paraphrases_only(wikiqa):
    train, _ = wikiqa
    right, other = train[0], next(e for e in first_examples(train) if e["subject"] != train[0]["subject"])
    reference = right["messages"][1]["content"]
    assert train.evaluate(right, reference) == 1
    assert train.evaluate(right, "Well: " + reference.upper()) == 1  # word overlap, not exact match
    assert train.evaluate(right, other["messages"][1]["content"]) == 0
    assert train.evaluate(right, right["subject"]) == 0  # naming the subject is not enough
    assert train.evaluate(right, "I don't know.") == 0
    subject_words = set(re.findall(r"\w+", right["subject"].lower()))
    without_subject = " ".join(w for w in re.findall(r"\w+", reference) if w.lower() not in subject_words)
    assert train.evaluate(right, without_subject) == 0  # the rest of the definition without naming the subject


# ---------------------------------------------------------------------------- WordNetMC


def parse_choices(question):
    return dict(reversed(line[2:].rsplit("=", 1)) for line in question.split("\n") if line.startswith("- "))


def test_wordnet_mc_renders_like_mmlu_with_uniform_letters(wordnet_mc, tiny_tokenizer):
    train, test = wordnet_mc
    assert len(train) > 15000 and len(test) > 1500 and train.eval_type == "categorical"
    for task in (train, test):
        assert_renders(task, tiny_tokenizer)
        for example in first_examples(task):
            question, letter = (m["content"] for m in example["messages"])
            choices = parse_choices(question)
            assert example["letters"] == ("A", "B", "C", "D") and sorted(choices) == ["A", "B", "C", "D"]
            assert choices[letter] == example["word"] and len(set(choices.values())) == 4
            assert question.startswith("Multiple Choice question: Which word means: ")
            definition = question.split("\n")[0].removeprefix("Multiple Choice question: Which word means: ")
            assert " " + example["word"].lower()[:5] not in " " + definition.lower()  # no giveaway
            assert task.evaluate(example, letter) == 1 and task.evaluate(example, f" {letter}\n") == 1
            assert task.evaluate(example, next(x for x in "ABCD" if x != letter)) == 0
    counts = collections.Counter(train[i]["messages"][1]["content"] for i in range(400))
    assert set(counts) == {"A", "B", "C", "D"} and min(counts.values()) > 60  # ~100 each


def test_wordnet_mc_is_deterministic_and_splits_share_no_word(wordnet_mc):
    train, test = wordnet_mc
    assert not {e["word"].lower() for e in train} & {e["word"].lower() for e in test}
    assert WordNetMC("train")[17] == train[17]
    assert [train[i]["messages"][1]["content"] for i in range(20)] != ["A"] * 20
