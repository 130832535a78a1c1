"""
Document processing for the nanochat_chat_* tasks: each row becomes the prompt our own chat_eval shows the model
(tasks/common.py render_mc, imported, so the two cannot drift apart) and the letters it may answer with.

With lm_eval --apply_chat_template the exported chat template wraps the prompt as a user turn and appends
<|assistant_start|>; each choice is one letter, so lm-eval's `acc` (the choice with the highest loglikelihood)
is the letter with the highest logit after <|assistant_start|>: exactly chat_eval's categorical scoring.
Needs nanochat importable (run lm_eval from this repository's venv).
"""
from tasks.arc import NUMBER_TO_LETTER
from tasks.common import render_mc

MMLU_LETTERS = ["A", "B", "C", "D"]


def process_arc_chat(dataset):
    """ARC rows (id, question, choices {text, label}, answerKey) -> query, letters, gold, as tasks/arc.py builds them."""
    def process(row):
        # some rows label their choices "1".."4": shown, and answered, as letters (tasks/arc.py)
        letters = [NUMBER_TO_LETTER.get(label, label) for label in row["choices"]["label"]]
        answer = NUMBER_TO_LETTER.get(row["answerKey"], row["answerKey"])
        return {"query": render_mc(row["question"], letters, row["choices"]["text"]), "letters": letters,
                "gold": letters.index(answer)}
    return dataset.map(process)


def process_mmlu_chat(dataset):
    """MMLU rows (question, subject, choices, answer) -> query, letters, gold, as tasks/mmlu.py builds them."""
    def process(row):
        return {"query": render_mc(row["question"], MMLU_LETTERS, row["choices"]), "letters": MMLU_LETTERS,
                "gold": row["answer"]}
    return dataset.map(process)
