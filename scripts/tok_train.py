"""
Train the tokenizer with our Rust BPE trainer on the pretraining text, then save it (the merges in tiktoken's
text format, a JSON config, token_bytes) to <base dir>/tokenizer.

    python -m scripts.tok_train --vocab-size 32768
    python -m scripts.tok_train --convert-pickle DIR   # a tokenizer.pkl from an older nanochat -> today's files

Default vocab 32768: at depth 20 (width 1280) the output head costs 6*1280*V FLOPs per token, ~8% of
the step (GPT.estimate_flops) at 32768 vs ~14% at 65536 (11% vs 21% of the blocks' own matmuls), while
65536 compresses text only ~4% better (see tok_eval), so the smaller vocab buys more tokens per FLOP.

The trainer sees text as a stream of documents; it splits each with the regex pattern, counts the
distinct chunks, and merges pairs within chunks only (nanochat/tokenizer.py, rustbpe/src/lib.rs).
"""
import argparse
import os
import pickle
import time

from nanochat.common import print0
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import LEGACY_PICKLE_FILE, RustBPETokenizer, get_tokenizer_dir


class PlainDataUnpickler(pickle.Unpickler):
    """Reads only what an old tokenizer.pkl holds (a dict of str, bytes and int): any class or function the
    file names, which is how a pickle runs code, is refused instead of imported."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}; a tokenizer pickle holds only plain data")


def convert_pickle(tokenizer_dir):
    """Rewrite an old-format tokenizer.pkl in tokenizer_dir as today's plain files (the pickle is left in place)."""
    path = os.path.join(tokenizer_dir, LEGACY_PICKLE_FILE)
    try:
        with open(path, "rb") as f:
            saved = PlainDataUnpickler(f).load()
        pattern, ranks = saved["pattern"], saved["mergeable_ranks"]
        if not isinstance(pattern, str) or not all(isinstance(t, bytes) and isinstance(r, int) for t, r in ranks.items()):
            raise ValueError("expected {'pattern': str, 'mergeable_ranks': {bytes: int}}")
    except (OSError, EOFError, KeyError, TypeError, AttributeError, ValueError, pickle.UnpicklingError) as e:
        raise SystemExit(f"cannot convert {path}: {e}")
    tokenizer = RustBPETokenizer.from_mergeable_ranks(pattern, ranks)
    tokenizer.save(tokenizer_dir)
    RustBPETokenizer.from_directory(tokenizer_dir)  # what was written loads, with its checks
    print0(f"converted {path} ({tokenizer.get_vocab_size():,} tokens) to the plain files in {tokenizer_dir}; "
           f"{LEGACY_PICKLE_FILE} is no longer read and can be deleted")

parser = argparse.ArgumentParser(description="Train the BPE tokenizer on the pretraining shards")
parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on at most this many characters")
parser.add_argument("--doc-cap", type=int, default=10_000, help="truncate each document to this many characters")
parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size including the special tokens")
parser.add_argument("--convert-pickle", metavar="DIR", default=None,
                    help="instead of training, convert DIR/tokenizer.pkl (the old format) to today's plain files")
args = parser.parse_args()
if args.convert_pickle is not None:
    convert_pickle(args.convert_pickle)
    raise SystemExit(0)
if args.max_chars <= 0 or args.doc_cap <= 0:
    parser.error("--max-chars and --doc-cap must be positive")
print0(f"max_chars: {args.max_chars:,}  doc_cap: {args.doc_cap:,}  vocab_size: {args.vocab_size:,}")

def text_iterator(seen):
    """Documents from the train split, each capped at doc_cap characters, up to max_chars in total; seen["chars"]
    counts what the trainer was given (the last document may cross the limit)."""
    for documents in parquets_iter_batched(split="train"):
        for document in documents:
            document = document[: args.doc_cap]  # a few huge documents must not dominate the pair counts
            seen["chars"] += len(document)
            yield document
            if seen["chars"] >= args.max_chars:
                return


start = time.time()
seen = {"chars": 0}
tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(seen), args.vocab_size)
chars_seen = seen["chars"]
train_time = time.time() - start
print0(f"Trained on {chars_seen:,} characters in {train_time:.1f}s ({chars_seen / 1e6 / max(train_time, 1e-9):.2f} M chars/s)")

tokenizer_dir = get_tokenizer_dir()
tokenizer.save(tokenizer_dir)
print0(f"Saved tokenizer and token_bytes to {tokenizer_dir}")

# sanity check: a round trip through the saved files (byte-level BPE must reproduce any string exactly,
# accents and emoji included: they are split into UTF-8 bytes, never mapped to an unknown token)
reloaded = RustBPETokenizer.from_directory(tokenizer_dir)
probe = "Hello world! 12345 naïve café 🙂 def f(x): return x**2"
assert reloaded.decode(reloaded.encode(probe)) == probe, "tokenizer round trip failed"

token_bytes = tokenizer.compute_token_bytes()
regular = token_bytes[token_bytes > 0].float()
get_report().log(
    section="Tokenizer training",
    data=[
        vars(args),
        {
            "train time (s)": round(train_time, 2),
            "characters": chars_seen,
            "vocab size": tokenizer.get_vocab_size(),
            "special tokens": len(tokenizer.get_special_tokens()),
            "token bytes min": int(regular.min().item()),
            "token bytes max": int(regular.max().item()),
            "token bytes mean": round(regular.mean().item(), 3),
        },
    ],
)
