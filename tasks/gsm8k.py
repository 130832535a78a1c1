"""
GSM8K: grade-school math word problems with worked solutions.
https://huggingface.co/datasets/openai/gsm8k

The solutions carry calculator annotations, e.g. "48/2 = <<48/2=24>>24 clips". We turn each one
into a python tool call ("48/2") followed by the tool's output ("24"), so the model learns to use
the calculator that the engine provides at inference. The final answer sits on a line "#### 72".
"""
import re
from decimal import Decimal, InvalidOperation

from tasks.common import Task, load_hub_dataset, shuffled

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
CALCULATOR_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(text):
    """The number after the first '#### ' marker, commas removed, as a string; None if absent."""
    match = ANSWER_RE.search(text)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "")


def same_number(a, b):
    """Exact numeric equality of two answer strings ('18' == '18.00'); False if either is missing or not a number."""
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


def solution_to_parts(answer):
    """A GSM8K solution string -> assistant content parts with the calculator calls as python tool use."""
    parts = []
    for piece in CALCULATOR_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expression, _, result = piece[2:-2].rpartition("=")
            if not expression:  # an annotation without "=": the whole thing is the expression
                expression, result = result, ""
            parts.append({"type": "python", "text": expression})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):

    def __init__(self, subset="main", split="test", path=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be main or socratic, got {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train or test, got {split!r}")
        self.rows = shuffled(load_hub_dataset("openai/gsm8k", subset, split, path=path))

    eval_type = "generative"

    def get_example(self, index):
        row = self.rows[index]
        messages = [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_to_parts(row["answer"])},
        ]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        return evaluate_final_answer(conversation, assistant_response)


def evaluate_final_answer(conversation, assistant_response):
    """1 if the reply's '#### N' matches the reference's (the last text part of the assistant message)."""
    reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
    return int(same_number(extract_answer(assistant_response), reference))
