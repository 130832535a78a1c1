"""
MMLU: multiple choice over 57 subjects (all subjects together), plus the ~100K auxiliary_train
questions used for midtraining.
https://huggingface.co/datasets/cais/mmlu
"""
from tasks.common import Task, load_hub_dataset, render_mc, shuffled


class MMLU(Task):
    letters = ("A", "B", "C", "D")

    def __init__(self, subset, split, path=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("all", "auxiliary_train"):
            raise ValueError(f"MMLU subset must be all or auxiliary_train, got {subset!r}")
        if subset == "all" and split not in ("validation", "dev", "test"):
            raise ValueError(f"MMLU all has splits validation, dev and test, got {split!r}")
        if subset == "auxiliary_train" and split != "train":
            raise ValueError(f"MMLU auxiliary_train only has split train, got {split!r}")
        # the hub stores the test set sorted by subject; shuffle so the first N problems are a fair sample
        self.rows = shuffled(load_hub_dataset("cais/mmlu", subset, split, path=path))

    eval_type = "categorical"

    def get_example(self, index):
        row = self.rows[index]
        if "train" in row:  # auxiliary_train nests each question under a "train" field
            row = row["train"]
        if len(row["choices"]) != 4:
            raise ValueError(f"MMLU question has {len(row['choices'])} choices, expected 4: {row['question'][:80]!r}")
        messages = [
            {"role": "user", "content": render_mc(row["question"], self.letters, row["choices"])},
            {"role": "assistant", "content": self.letters[row["answer"]]},
        ]
        return {"messages": messages, "subject": row["subject"], "letters": self.letters}

    def evaluate(self, conversation, assistant_response):
        return int(assistant_response.strip() == conversation["messages"][-1]["content"])
