"""
Synthetic tasks that teach a tokenized model to look inside its tokens:
- SpellingBee: "How many r are in strawberry?" answered by spelling the word out, counting by hand,
  and double-checking with a python tool call, ending in "#### 3".
- SimpleSpelling: "Spell the word: apple" -> "apple:a,p,p,l,e".

Words come from words.txt next to this file: the lowercase 3-12 letter words of the SCOWL
American English list (Debian package wamerican; license in words_LICENSE.txt). About a tenth of
the words, picked by a hash of the word, are held out for the test split so that the eval
measures the skill and not memorized words.
"""
import os
import random
import zlib

from tasks.common import Task
from tasks.gsm8k import evaluate_final_answer

WORDS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "words.txt")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
USER_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "How many times does the letter {letter} appear in {word}",
    "Count the number of {letter} in {word}",
    "Count how many times {letter} occurs in the word {word}",
    "What is the count of the letter {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How often does {letter} show up in {word}",
    "Tell me the number of {letter}s in {word}",
    "{word}: how many {letter}",
]


def load_words(split, words_path=WORDS_PATH):
    """The words of one split; test holds the ~10% of words whose crc32 is 0 mod 10."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    if not os.path.exists(words_path):
        raise FileNotFoundError(f"word list {words_path} does not exist; pass words_path= a file with one word per line")
    with open(words_path, encoding="utf-8") as f:
        words = [line.strip().lower() for line in f if line.strip().isalpha()]
    in_test = lambda word: zlib.crc32(word.encode()) % 10 == 0
    words = [word for word in words if in_test(word) == (split == "test")]
    if not words:
        raise ValueError(f"no {split} words in {words_path}")
    return words


def spell_and_count(word, letter):
    """The by-hand part of the answer: spell the word out, then walk it keeping a running count."""
    lines = [
        f"We are asked to count the letter '{letter}' in the word '{word}'. Let me first do it by hand.",
        "",
        "Spell the word out:",
        # comma-separated, each letter lands in a regex chunk of its own (",p"), so no token holds two letters:
        # the count below then runs over letters the model can see, not letters hidden inside a word's tokens
        f"{word}:{','.join(word)}",
        "",
        f"Then count the occurrences of '{letter}':",
    ]
    count = 0
    for position, char in enumerate(word, 1):
        if char == letter:
            count += 1
            lines.append(f"{position}:{char} hit! count={count}")
        else:
            lines.append(f"{position}:{char}")
    lines += ["", f"This gives us {count}."]
    return "\n".join(lines)


class SpellingBee(Task):

    def __init__(self, size=1000, split="train", words_path=WORDS_PATH, **kwargs):
        super().__init__(**kwargs)
        self.size = size
        self.split = split
        self.words = load_words(split, words_path)

    eval_type = "generative"

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(index)  # example i is the same on every run and every rank
        word = rng.choice(self.words)
        # mostly a letter of the word, sometimes one that is absent so that 0 is a possible answer
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        quote_letter, quote_word = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        template = rng.choice(USER_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        question = template.format(letter=f"{quote_letter}{letter}{quote_letter}", word=f"{quote_word}{word}{quote_word}")
        if rng.random() < 0.5:
            question += "?"
        parts = [
            {"type": "text", "text": spell_and_count(word, letter)},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            # the same question answered two ways, by hand and then with the tool: the model learns both
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        return evaluate_final_answer(conversation, assistant_response)


class SimpleSpelling(Task):

    def __init__(self, size=1000, split="train", words_path=WORDS_PATH, **kwargs):
        super().__init__(**kwargs)
        self.size = size
        self.words = load_words(split, words_path)

    eval_type = "generative"

    def num_examples(self):
        return self.size

    def get_example(self, index):
        word = random.Random(index).choice(self.words)
        messages = [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        return int(assistant_response.strip() == conversation["messages"][-1]["content"])
