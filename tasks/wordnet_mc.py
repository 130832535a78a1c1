"""
WordNetMC: "Which word means: <gloss>?" with four lettered choices, answered with one letter: an
offline multiple-choice stand-in in MMLU's exact format (tasks/mmlu.py), so the categorical eval
and the letter-answer habit can be trained and measured without the Hugging Face hub.

The glosses are real: the WordNet 3.0 synsets embedded in the sample corpus
(nanochat/sample_data/*.parquet, one "words (pos.): gloss" line per synset; see
nanochat/sample_corpus.py), about 35,000 of WordNet's 117,000 synsets. WordNet 3.0 is Copyright 2006
by Princeton University, under the WordNet 3.0 license (BSD-like; quoted in tasks/NOTICE).

Each question asks for the first word of a synset from its definition (the gloss without its
quoted usage examples, which usually contain the word). The three wrong choices are first words
of other synsets of the same part of speech that share no synset of the sample with the answer
(the sample holds ~30% of WordNet, so a rare distractor may still be a synonym). Synsets whose
definition gives the word away (a word of it starts with the first five letters of one of the
synset's words: "eels that live in fresh water" for "freshwater eel") are left out. A word
is in the test split when the crc32 of its lowercase form is 0 mod 10, so no answer word is in
both splits, and the wrong choices come from the same split's words.
"""
import functools
import random
import re
import zlib

from tasks.common import Task, render_mc
from nanochat.sample_corpus import SAMPLE_FILES, document_source, sample_documents

SYNSET_LINE_RE = re.compile(r"^(.+?) \((n|v|adj|adv)\.\): (.+)$")
NON_WORD_RE = re.compile(r"\W+")
USAGE_EXAMPLES_RE = re.compile(r';\s*"')  # WordNet glosses end with '; "example"; "example"'
MIN_DEFINITION_CHARS = 12  # shorter ones ("turnstones") are not definitions a reader could answer from


@functools.lru_cache(maxsize=None)
def wordnet_synsets():
    """(words, part of speech, definition) of every synset in the sample corpus, in file order (cached: read once)."""
    synsets = []
    for file_name in SAMPLE_FILES:
        for text in sample_documents(file_name):
            if document_source(text) != "wordnet":
                continue
            for line in text.split("\n"):
                match = SYNSET_LINE_RE.match(line)
                if match:
                    words, pos, gloss = match.groups()
                    synsets.append((tuple(words.split(", ")), pos, USAGE_EXAMPLES_RE.split(gloss)[0].strip()))
    return tuple(synsets)


def spaced_lowercase(text):
    """"The eel's tail" -> " the eel s tail": then " " + w is in it exactly when one of its words starts with w."""
    return " " + NON_WORD_RE.sub(" ", text.lower())


def gives_word_away(words, definition):
    """True if a definition contains the start of one of its own words ('eels that live...' for eel)."""
    text = spaced_lowercase(definition)
    return any(spaced_lowercase(word)[:6] in text for word in words)  # " " + five letters: a word starting so


def in_test_split(word):
    return zlib.crc32(word.lower().encode("utf-8")) % 10 == 0


class WordNetMC(Task):
    letters = ("A", "B", "C", "D")

    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"WordNetMC split must be train or test, got {split!r}")
        self.split = split
        synsets = wordnet_synsets()
        self.synonyms = {}  # lowercase word -> every word it shares a synset with, itself included
        for words, _, _ in synsets:
            for word in words:
                self.synonyms.setdefault(word.lower(), set()).update(w.lower() for w in words)
        self.questions = [
            (words[0], pos, definition) for words, pos, definition in synsets
            if in_test_split(words[0]) == (split == "test")
            and len(definition) >= MIN_DEFINITION_CHARS and not gives_word_away(words, definition)
        ]
        # the corpus keeps synsets of one topic together; shuffle so that the first N are a fair sample
        random.Random(42).shuffle(self.questions)
        self.words_by_pos = {}
        for word, pos, _ in self.questions:
            self.words_by_pos.setdefault(pos, set()).add(word)
        self.words_by_pos = {pos: sorted(words) for pos, words in self.words_by_pos.items()}  # sorted: same on every run

    eval_type = "categorical"

    def num_examples(self):
        return len(self.questions)

    def wrong_choices(self, word, pos, rng):
        """Three distinct words of the same part of speech, none of them in a synset with word."""
        synonyms = self.synonyms[word.lower()]
        chosen = []
        while len(chosen) < 3:
            candidate = rng.choice(self.words_by_pos[pos])
            if candidate.lower() not in synonyms and candidate.lower() not in (c.lower() for c in chosen):
                chosen.append(candidate)
        return chosen

    def get_example(self, index):
        word, pos, definition = self.questions[index]
        rng = random.Random(f"wordnet_mc:{self.split}:{index}")  # the same choices and letter on every run and rank
        choices = self.wrong_choices(word, pos, rng)
        answer_position = rng.randrange(len(self.letters))  # uniform over A-D, so no letter is a safe guess
        choices.insert(answer_position, word)
        messages = [
            {"role": "user", "content": render_mc(f"Which word means: {definition}?", self.letters, choices)},
            {"role": "assistant", "content": self.letters[answer_position]},
        ]
        return {"messages": messages, "letters": self.letters, "word": word}

    def evaluate(self, conversation, assistant_response):
        return int(assistant_response.strip() == conversation["messages"][-1]["content"])
