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


def identity_conversations_path():
    """
    Who the assistant says it is: $NANOCHAT_BASE_DIR/identity_conversations.jsonl when that file exists
    (drop one there to rename your assistant), else the set shipped next to this file.
    """
    from nanochat.common import get_base_dir

    override = os.path.join(get_base_dir(), "identity_conversations.jsonl")
    return override if os.path.exists(override) else IDENTITY_CONVERSATIONS


class CustomJSON(Task):

    def __init__(self, filepath=IDENTITY_CONVERSATIONS, **kwargs):
        super().__init__(**kwargs)
        if not os.path.exists(filepath):
            raise FileNotFoundError(f"conversation file {filepath} does not exist; pass filepath= a .jsonl file")
        self.conversations = []
        with open(filepath, "rb") as f:  # bytes: a line that is not UTF-8 is named below, not a UnicodeDecodeError
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise ValueError(f"{filepath}:{line_number}: not valid JSON ({error})") from None
                messages = item.get("messages") if isinstance(item, dict) else item
                where = f"{filepath}:{line_number}"
                if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
                    raise ValueError(f"{where}: expected a JSON list of {{\"role\": ..., \"content\": ...}} messages")
                check_conversation(messages, where)
                self.conversations.append({"messages": messages})

    eval_type = "generative"

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]
