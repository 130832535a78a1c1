"""
Rebuild tasks/chatterbot_conversations.jsonl, the data of the ChatterbotConversations stand-in
(tasks/chatterbot.py), from the English dialogues of the PyPI package chatterbot-corpus
(BSD-3-Clause, Copyright (c) 2017 Gunther Cox; licence text in tasks/NOTICE).

The package is downloaded, not installed: it is data only, and its test extra pins an old PyYAML.

  python dev/build_chat_standins.py                      # downloads chatterbot-corpus==1.3.3 with pip
  python dev/build_chat_standins.py --sdist /tmp/chatterbot_corpus-1.3.3.tar.gz

Each dialogue is a list of messages that ChatterBot reads as statement, response, statement, ...
We turn it into one conversation, user and assistant alternating (an odd last message is dropped),
except in the files whose dialogues are one prompt followed by alternative replies (emotion,
computers): there each reply becomes its own two-message conversation with the prompt. Exact
duplicate conversations (tech_support.yml repeats many) are written once. Output is deterministic.

The other stand-ins need no build step: tasks/arithmetic.py is generated, and tasks/wikiqa.py and
tasks/wordnet_mc.py read the embedded sample corpus (nanochat/sample_data, dev/build_sample_corpus.py).
"""
import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATTERBOT_VERSION = "1.3.3"
# files whose dialogues are "prompt, reply, another reply, ..." rather than a back-and-forth
ALTERNATIVE_REPLY_FILES = {"emotion.yml", "computers.yml"}


def download_sdist(version, directory):
    """pip download the chatterbot-corpus sdist (it has the licence file; the wheel does not)."""
    pip = [sys.executable, "-m", "pip"] if importlib.util.find_spec("pip") else ["pip"]  # uv venvs ship without pip
    command = pip + ["download", f"chatterbot-corpus=={version}", "--no-deps", "--no-binary", ":all:", "-d", directory]
    subprocess.run(command, check=True)
    return glob.glob(os.path.join(directory, f"chatterbot_corpus-{version}.tar.gz"))[0]


def read_english_files(sdist_path, directory):
    """{file name: parsed YAML} of chatterbot_corpus/data/english/*.yml in the sdist."""
    with tarfile.open(sdist_path) as archive:
        members = [m for m in archive.getmembers() if "/chatterbot_corpus/data/english/" in m.name and m.name.endswith(".yml")]
        archive.extractall(directory, members=members, filter="data")
    files = {}
    for path in sorted(glob.glob(os.path.join(directory, "*", "chatterbot_corpus", "data", "english", "*.yml"))):
        with open(path, encoding="utf-8") as f:
            files[os.path.basename(path)] = yaml.load(f, Loader=yaml.BaseLoader)  # BaseLoader: "Yes" and "1984" stay strings
    return files


def dialogue_to_conversations(dialogue, alternative_replies):
    """One dialogue -> a list of message lists (roles alternate, user first, assistant last)."""
    texts = [text.strip() for text in dialogue]
    if alternative_replies:
        return [[{"role": "user", "content": texts[0]}, {"role": "assistant", "content": reply}] for reply in texts[1:]]
    texts = texts[:len(texts) // 2 * 2]  # an odd last message has no reply
    if not texts:
        return []
    return [[{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(texts)]]


def build_conversations(files):
    rows, seen, skipped = [], set(), 0
    for file_name, data in files.items():
        category = data["categories"][0]
        for dialogue in data["conversations"]:
            if not isinstance(dialogue, list) or len(dialogue) < 2 or not all(text.strip() for text in dialogue):
                skipped += 1  # e.g. trivia.yml has one entry that a YAML slip turned into a single string
                continue
            for messages in dialogue_to_conversations(dialogue, file_name in ALTERNATIVE_REPLY_FILES):
                key = json.dumps(messages)
                if key not in seen:
                    seen.add(key)
                    rows.append({"messages": messages, "category": category})
    return rows, skipped


def main():
    parser = argparse.ArgumentParser(description="Rebuild tasks/chatterbot_conversations.jsonl from chatterbot-corpus")
    parser.add_argument("--sdist", default=None, help=f"a downloaded chatterbot_corpus-{CHATTERBOT_VERSION}.tar.gz (default: pip download it)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "tasks", "chatterbot_conversations.jsonl"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(CHATTERBOT_VERSION, tmp)
        rows, skipped = build_conversations(read_english_files(sdist, tmp))
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: {len(rows)} conversations ({skipped} malformed dialogues skipped), {os.path.getsize(args.out) / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
