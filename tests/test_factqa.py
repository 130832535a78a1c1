"""
FactQA (tasks/factqa.py) and the hand-written factual eval (dev/eval_facts.py): facts read correctly from the
embedded corpus, questions in both directions, an honest held-out split, and an eval no template produces.
"""
import os
import re
import subprocess
import sys

import pytest

from dev import eval_facts
from tasks.factqa import (TEST_TEMPLATES, TRAIN_TEMPLATES, FactQA, answered_by, corpus_facts, extract_facts, fact_split,
                          fill, question_kinds)
from tests.conftest import REPO_ROOT, write_tiny_checkpoints

# hand-checked against the summaries: each is what the corpus' train file states
KNOWN_FACTS = [("capital", "Paris", "France"), ("capital", "Ottawa", "Canada"), ("capital", "Munich", "Bavaria"),
               ("symbol", "gold", "Au"), ("symbol", "tungsten", "W"), ("planet", "Mars", "fourth"),
               ("creator", "Pride and Prejudice", "Jane Austen"), ("creator", "Carmen", "Georges Bizet"),
               ("person", "John Locke", "English"), ("located", "Timbuktu", "Mali"),
               ("superlative", "Istanbul", "the largest city in Turkey")]


def test_reads_the_facts_the_corpus_states():
    facts = {(fact.relation, fact.subject, fact.value) for fact in corpus_facts("train")}
    assert len(facts) > 600
    missing = [fact for fact in KNOWN_FACTS if fact not in facts]
    assert not missing, missing
    relations = {relation for relation, _, _ in facts}
    assert relations == {"capital", "symbol", "planet", "creator", "person", "located", "superlative"}


@pytest.mark.parametrize("text, expected", [
    ("Paris is the capital and largest city of France. It lies on the Seine.", [("capital", "Paris", "France")]),
    ("Kigali is a city.\n", []),
    ("Gold is a chemical element; it has the chemical symbol Au and atomic number 79.", [("symbol", "gold", "Au")]),
    ("Dune is a 1965 epic science fiction novel by American author Frank Herbert.", [("creator", "Dune", "Frank Herbert")]),
    # misreadings the patterns once made, each now rejected
    ("The Last Supper is a mural painting by the High Renaissance artist Leonardo da Vinci.", []),
    ("Chicago is the most populous city in the U.S. state of Illinois and in the Midwestern United States.", []),
    ("Constantinople was the capital of the Roman and Byzantine Empire.", []),
    ("Casablanca is a 1942 American film by Warner Bros.", []),  # a film "by" a studio: only "directed by" counts
])
def test_extract_facts_reads_or_refuses(text, expected):
    assert [(fact.relation, fact.subject, fact.value) for fact in extract_facts(text)] == expected


def test_both_directions_and_a_held_out_split():
    train, test = FactQA("train", phrasings=4), FactQA("test")
    train_facts = {fact.key for fact in corpus_facts("train") if fact_split(fact) == "train"}
    test_facts = {fact.key for fact in corpus_facts("train") if fact_split(fact) == "test"}
    assert train_facts and test_facts and not train_facts & test_facts
    assert 0.1 < len(test_facts) / (len(train_facts) + len(test_facts)) < 0.3
    # no test question is asked in training, and the two splits use different phrasings
    train_questions = {train[i]["messages"][0]["content"] for i in range(len(train))}
    test_questions = {test[i]["messages"][0]["content"] for i in range(len(test))}
    assert not train_questions & test_questions
    for kind in TRAIN_TEMPLATES:
        assert not set(TRAIN_TEMPLATES[kind]) & set(TEST_TEMPLATES[kind])
    # both directions: France -> Paris and Paris -> France
    paris = next(fact for fact in corpus_facts("train") if fact.subject == "Paris" and fact.relation == "capital")
    (_, _, to_city, city), (_, _, to_place, place) = question_kinds(paris)
    assert city == ["Paris"] and place == ["France"] and "Paris" in to_city and "France" in to_place
    # no question holds its own answer (echoing it back would score)
    for task in (train, test):
        for i in range(len(task)):
            example = task[i]
            assert not answered_by(example["messages"][0]["content"], example["answers"]), example
            assert task.evaluate(example, example["messages"][1]["content"]) == 1  # the reply states the answer


def test_evaluate_by_answer_words():
    conversation = {"answers": ["Jane Austen"]}
    task = FactQA("test", stop=1)
    assert task.evaluate(conversation, "It was written by Jane Austen.") == 1
    assert task.evaluate(conversation, "It was written by Jane Eyre.") == 0
    assert task.evaluate({"answers": ["Paris"]}, "paris, of course") == 1
    assert task.evaluate({"answers": ["Paris"]}, "Parisian") == 0  # whole words, not substrings


def test_eval_facts_is_hand_written_about_corpus_facts():
    assert len(eval_facts.QUESTIONS) >= 60
    groups = eval_facts.fact_groups()  # raises if a question asks about a fact the train file does not state
    assert set(groups.values()) == {"drilled", "only read"}
    # every question any template (train or test split) could produce, for every fact
    templated = set()
    for fact in corpus_facts("train"):
        for kind, fields, _, _ in question_kinds(fact):
            for template in TRAIN_TEMPLATES[kind] + TEST_TEMPLATES[kind]:
                templated.add(fill(template, fields).lower())
    for question, answers, _ in eval_facts.QUESTIONS:
        assert question.lower() not in templated, question
        assert not answered_by(question, answers), question
    assert eval_facts.QUESTIONS[0][0] == "What is the capital of France?"


@pytest.mark.slow
def test_eval_facts_script_scores_every_question(tiny_tokenizer, tmp_path):
    write_tiny_checkpoints(tiny_tokenizer, str(tmp_path), ["chatsft_checkpoints"])
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), OMP_NUM_THREADS="1", NANOCHAT_DATA="sample")
    result = subprocess.run([sys.executable, "-m", "dev.eval_facts", "--device-type", "cpu", "--max-new-tokens", "4", "--show", "3"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    total = re.search(r"(\d+)/(\d+) = [0-9.]+% of the hand-written", result.stdout)
    groups = re.findall(r"(drilled|only read): (\d+)/(\d+)", result.stdout)
    assert int(total.group(2)) == len(eval_facts.QUESTIONS)
    assert sum(int(count) for _, count, _ in groups) == int(total.group(1))
    assert sum(int(size) for _, _, size in groups) == len(eval_facts.QUESTIONS)
    samples = re.findall(r"^  (right|wrong): (['\"])(.+?)\2 -> ", result.stdout, re.M)  # repr quotes "What's ..." with "
    assert len(samples) == 3 and samples[0][2] == "What is the capital of France?", result.stdout
