"""
Conversations from a local JSONL file: one conversation per line, either a JSON list of messages
or {"messages": [...]}. Used to teach the model facts about itself (identity_conversations.jsonl,
shipped next to this file) or anything else you write by hand.
"""
import json
import os

from tasks.common import Task
from tasks.smoltalk import check_conversation

IDENTITY_CONVERSATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "identity_conversations.jsonl")


class CustomJSON(Task):

    def __init__(self, filepath=IDENTITY_CONVERSATIONS, **kwargs):
        super().__init__(**kwargs)
        if not os.path.exists(filepath):
            raise FileNotFoundError(f"conversation file {filepath} does not exist; pass filepath= a .jsonl file")
        self.conversations = []
        with open(filepath, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{filepath}:{line_number}: not valid JSON ({error})") from None
                messages = item["messages"] if isinstance(item, dict) else item
                check_conversation(messages, f"{filepath}:{line_number}")
                self.conversations.append({"messages": messages})

    eval_type = "generative"

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]
