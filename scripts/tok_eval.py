"""
Compression (bytes per token) of our tokenizer on several kinds of text, beside GPT-2's and GPT-4's
when tiktoken can load them (it needs the network once; offline those columns say "unavailable").

    python -m scripts.tok_eval
"""
import argparse

import tiktoken

from nanochat.common import print0
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

parser = argparse.ArgumentParser(description="Evaluate the tokenizer's compression")
parser.add_argument("--data-chars", type=int, default=200_000, help="characters of train/val data to measure on")
args = parser.parse_args()

SAMPLES = {
    "english": (
        "The Industrial Revolution began in Great Britain in the late eighteenth century and spread to Europe "
        "and North America. Mechanised spinning and weaving, the steam engine and new ways of making iron "
        "changed how goods were produced, where people lived and how they worked. Historians still debate "
        "why it started where it did: cheap coal, high wages, secure property rights and a culture of "
        "tinkering all played a part."
    ),
    "code": (
        "def merge_sorted(left, right):\n"
        "    result, i, j = [], 0, 0\n"
        "    while i < len(left) and j < len(right):\n"
        "        if left[i] <= right[j]:\n"
        "            result.append(left[i]); i += 1\n"
        "        else:\n"
        "            result.append(right[j]); j += 1\n"
        "    return result + left[i:] + right[j:]\n\n"
        "for n in range(10):\n    print(f\"{n:>3} {n ** 2:>5}\")\n"
    ),
    "math": (
        "Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12 = 0 gives x = 2, and f(2) = 12 - 24 + 7 = -5. "
        "\\int_0^1 x^2 \\, dx = \\frac{1}{3}. 1234 * 5678 = 7006652; 3.14159 / 2 = 1.570795; e^{i\\pi} + 1 = 0."
    ),
    "korean": (
        "대한민국은 동아시아의 한반도 남부에 있는 민주공화국이다. 수도는 서울특별시이며, 인구는 약 5천만 명이다. "
        "한국어를 공용어로 사용하며 한글을 쓴다."
    ),
}


def data_sample(split, max_chars):
    texts, total = [], 0
    for documents in parquets_iter_batched(split=split):
        for document in documents:
            texts.append(document)
            total += len(document)
            if total >= max_chars:
                return "\n".join(texts)
    return "\n".join(texts)


def load_reference(name):
    try:
        return tiktoken.get_encoding(name)
    except Exception as error:  # offline or blocked: keep going without this column
        print0(f"{name} tokenizer unavailable ({type(error).__name__}); its column says unavailable")
        return None


texts = dict(SAMPLES)
texts["train data"] = data_sample("train", args.data_chars)
texts["val data"] = data_sample("val", args.data_chars)

try:
    ours = get_tokenizer().enc
except (FileNotFoundError, ValueError) as e:  # not trained yet, or a damaged file: the message says what to run
    parser.error(str(e))
tokenizers = {"ours": ours, "gpt2": load_reference("gpt2"), "gpt4": load_reference("cl100k_base")}
rows = []
header = f"{'text':<12} {'bytes':>9} " + " ".join(f"{name + ' B/tok':>14}" for name in tokenizers)
print0(header)
print0("-" * len(header))
for label, text in texts.items():
    num_bytes = len(text.encode("utf-8"))
    ratios = {}
    for name, encoding in tokenizers.items():
        ratios[name] = num_bytes / max(1, len(encoding.encode_ordinary(text))) if encoding else None
    print0(f"{label:<12} {num_bytes:>9,} " + " ".join(f"{r:>14.3f}" if r else f"{'unavailable':>14}" for r in ratios.values()))
    rows.append({f"{label} bytes/token ({name})": round(r, 3) if r else "unavailable" for name, r in ratios.items()})

get_report().log(section="Tokenizer evaluation", data=rows)
