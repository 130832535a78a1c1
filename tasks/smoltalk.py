"""
SmolTalk (the smol version): general chat conversations for SFT and midtraining.
https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk
"""
from tasks.common import Task, load_hub_dataset, shuffled


def check_conversation(messages, where):
    """An optional system message, then user/assistant alternating, starting with user, all plain strings."""
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if len(rest) < 2:
        raise ValueError(f"{where}: a conversation needs at least one user and one assistant message")
    for i, message in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"{where}: message {i} has role {message['role']!r}, expected {expected!r} (roles must alternate)")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}: message {i} content must be a string")


class SmolTalk(Task):

    def __init__(self, split, path=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, got {split!r}")
        self.rows = shuffled(load_hub_dataset("HuggingFaceTB/smol-smoltalk", None, split, path=path))

    eval_type = "generative"

    def get_example(self, index):
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]
        check_conversation(messages, f"SmolTalk row {index}")
        return {"messages": messages}
