"""
ChatterbotConversations: about a thousand short, human-written chat exchanges (greetings, small
talk, trivia, jokes, questions about the bot itself, a little coding help), an offline stand-in
for general chat data like SmolTalk (which lives on the Hugging Face hub).

The data is tasks/chatterbot_conversations.jsonl, one {"messages": [...], "category": ...} per line,
converted by dev/build_chat_standins.py from the English dialogues of the PyPI package
chatterbot-corpus 1.3.3 (user contributed; BSD-3-Clause, Copyright (c) 2017 Gunther Cox; licence
text in tasks/NOTICE). Most conversations are one question and one answer; a few go on for
several turns. A conversation is in the test split when the crc32 of its first user message is 0
mod 10, so a prompt never appears in both splits (even when the corpus answers it several ways).

evaluate() is exact match with the reference reply: chit-chat has no single right answer, so this
is for smoke-testing a chat eval loop, not a benchmark.
"""
import json
import os
import zlib

from tasks.common import Task, shuffled
from tasks.smoltalk import check_conversation

CHATTERBOT_CONVERSATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chatterbot_conversations.jsonl")


def in_test_split(messages):
    return zlib.crc32(messages[0]["content"].encode("utf-8")) % 10 == 0


class ChatterbotConversations(Task):

    def __init__(self, split="train", filepath=CHATTERBOT_CONVERSATIONS, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"ChatterbotConversations split must be train or test, got {split!r}")
        if not os.path.exists(filepath):
            raise FileNotFoundError(f"conversation file {filepath} does not exist; rebuild it with dev/build_chat_standins.py")
        with open(filepath, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for line_number, row in enumerate(rows, 1):
            check_conversation(row["messages"], f"{filepath}:{line_number}")
        # the file is grouped by category; shuffle so that the first N are a fair sample
        self.rows = shuffled([row for row in rows if in_test_split(row["messages"]) == (split == "test")])

    eval_type = "generative"

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": row["messages"], "category": row["category"]}

    def evaluate(self, conversation, assistant_response):
        return int(assistant_response.strip() == conversation["messages"][-1]["content"].strip())
