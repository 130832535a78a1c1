"""
ARC (AI2 Reasoning Challenge): grade-school science multiple choice, Easy and Challenge sets.
https://huggingface.co/datasets/allenai/ai2_arc
"""
from tasks.common import Task, load_hub_dataset, render_mc

# a few rows label their choices "1".."4"; we show every question with letters so the model
# only ever has to answer with a letter
NUMBER_TO_LETTER = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}


class ARC(Task):

    def __init__(self, subset, split, path=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train, validation or test, got {split!r}")
        self.rows = load_hub_dataset("allenai/ai2_arc", subset, split, path=path)

    eval_type = "categorical"

    def get_example(self, index):
        row = self.rows[index]
        letters = [NUMBER_TO_LETTER.get(label, label) for label in row["choices"]["label"]]
        answer = NUMBER_TO_LETTER.get(row["answerKey"], row["answerKey"])
        if answer not in letters:
            raise ValueError(f"ARC row {row.get('id')}: answerKey {row['answerKey']!r} is not one of the choice labels")
        messages = [
            {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
            {"role": "assistant", "content": answer},
        ]
        return {"messages": messages, "letters": letters}

    def evaluate(self, conversation, assistant_response):
        return int(assistant_response.strip() == conversation["messages"][-1]["content"])
