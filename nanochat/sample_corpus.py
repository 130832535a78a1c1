"""
Read the embedded sample corpus (nanochat/sample_data/{train,val}.parquet) and tell its four
sources apart, for the offline stand-in tasks built on it (tasks/wikiqa.py, tasks/wordnet_mc.py).
Pretraining reads the same files as shards (nanochat/dataset.py); this is the per-document view.

dev/build_sample_corpus.py lays the documents out so that each source has its own shape:
  bible      "Genesis 1\n\nIn the beginning..."            book and chapter, blank line, verses
  jargon     "cycle -\n\n1. n. The basic unit..."           "term - [pronunciation, part of speech]", blank line
  wordnet    "level, layer, stratum (n.): an abstract..."   one synset per line: "words (pos.): gloss"
  wikipedia  "Thermodynamics is a branch of physics..."     a bare article lead summary: no title, no markup
The documents of all sources are shuffled together, and no document is in both files.
"""
import functools
import os
import re

from nanochat.dataset import SAMPLE_DIR

# the two splits; no document is in both, so a task that tests on val documents tests on text pretraining never saw
SAMPLE_FILES = ("train", "val")

# Each pattern anchors at the start of a document and recognises its source's first line (the shapes above).
# "Genesis 1", "1 Kings 3": an optional book number, a capitalised book name, a chapter number, a blank line
BIBLE_CHAPTER_RE = re.compile(r"^(?:[123] )?[A-Z][A-Za-z ]+ \d+\n\n")
# a headword of at most 80 characters, " -", optionally its pronunciation / part of speech, a blank line
JARGON_ENTRY_RE = re.compile(r"^[^\n]{1,80} -(?: [^\n]*)?\n\n")
# "words (n.): " with one of WordNet's four parts of speech; lazy *? so the first " (pos.): " ends the words
WORDNET_SYNSET_RE = re.compile(r"^[^\n]*? \((?:n|v|adj|adv)\.\): ")


@functools.lru_cache(maxsize=None)
def sample_documents(file_name):
    """The `text` column of nanochat/sample_data/<file_name>.parquet, in file order (a tuple: it is cached)."""
    if file_name not in SAMPLE_FILES:
        raise ValueError(f"the sample corpus has files {SAMPLE_FILES}, got {file_name!r}")
    path = os.path.join(SAMPLE_DIR, f"{file_name}.parquet")
    if not os.path.exists(path):
        raise FileNotFoundError(f"sample corpus file {path} does not exist; rebuild it with dev/build_sample_corpus.py")
    import pyarrow.parquet as pq

    return tuple(pq.read_table(path, columns=["text"]).column("text").to_pylist())


def document_source(text):
    """Which source a sample document comes from: 'bible', 'jargon', 'wordnet' or 'wikipedia'."""
    if BIBLE_CHAPTER_RE.match(text):
        return "bible"
    if WORDNET_SYNSET_RE.match(text):
        return "wordnet"
    if JARGON_ENTRY_RE.match(text):
        return "jargon"
    return "wikipedia"  # the summaries are plain prose: whatever has none of the other shapes
