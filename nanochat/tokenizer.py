"""
The tokenizer: trained by our Rust BPE trainer (rustbpe), run by tiktoken (fast, multithreaded encoding).

Byte-level BPE, as in GPT-2 (Radford et al. 2019) and GPT-4: start from the 256 byte values, so any
string, in any language, encodes with no unknown token, then repeatedly merge the most frequent
adjacent pair of tokens into a new token. Training is where the time goes (counting pairs over
billions of characters), which is why it is written in Rust; encoding with a fixed list of merges is
tiktoken's job. Before merging, text is split by a regex into chunks (words with their leading space,
runs of digits, punctuation, whitespace) and merges never cross a chunk boundary, so " dog." and
" dog!" both use the token " dog" instead of spending vocabulary on " dog." and " dog!".

Vocabulary layout: 256 byte tokens, then the merges, then the special tokens below. The chat format
(docs/chat_format.md) is rendered here, together with the loss mask that says which tokens the assistant must learn.

On disk a tokenizer is plain text, never a pickle (unpickling runs whatever code the file names, and a
tokenizer is read by every stage and by the chat server): `tokenizer.tiktoken` holds the merges in
tiktoken's own format, one `base64(token bytes) rank` per line, and `tokenizer_config.json` the split
pattern and the special tokens. Every saved file carries its size and sha256 next to it (<file>.json), so
a damaged one is named, with the fix: rerun tok_train (nanochat/artifacts.py).
"""
import base64
import binascii
import json
import os

import rustbpe
import tiktoken
import torch

from nanochat.artifacts import DamagedArtifactError, load_checked, read_json, read_sidecar, write_recorded
from nanochat.common import get_base_dir

# Appended after the BPE tokens, in this order, so their ids are the last nine of the vocabulary. The order is
# part of the saved format: read_tokenizer_config refuses a config whose ids differ (docs/chat_format.md).
SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, forced in by the engine (never trained on)
    "<|output_end|>",
]

# GPT-4's split pattern with digits grouped 1-2 (not 1-3): fewer number merges at our small vocab sizes.
# Its alternatives, tried left to right at each position (each match is one chunk; merges stay inside it):
#   '(?i:[sdmt]|ll|ve|re)          English contractions: 's 'd 'm 't 'll 've 're, any case
#   [^\r\n\p{L}\p{N}]?+\p{L}+      a word, with at most one leading non-letter (usually its space: " dog")
#   \p{N}{1,2}                     numbers in pieces of 1-2 digits, so 2048 is "20" "48", never one token
#    ?[^\s\p{L}\p{N}]++[\r\n]*     punctuation and symbols, with an optional leading space and trailing newlines
#   \s*[\r\n]                      whitespace up to and including a newline
#   \s+(?!\S)                      a run of spaces, leaving the last one to start the next word's chunk
#   \s+                            whatever whitespace is left
# ?+ and ++ are possessive (no backtracking). rustbpe runs this pattern on a faster regex engine by emulating
# the lookahead and dropping the possessives where they cannot change a match (dev/BENCHMARKS.md, tokenizer).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# the merges: `base64(token bytes) rank` per line, as tiktoken.load.load_tiktoken_bpe reads
RANKS_FILE = "tokenizer.tiktoken"
# the split pattern, the special tokens and their ids, the vocab size
CONFIG_FILE = "tokenizer_config.json"
# the format before: refused on load, converted by tok_train --convert-pickle
LEGACY_PICKLE_FILE = "tokenizer.pkl"
# 64x the default vocab; a config asking for more is damaged or hostile, not a tokenizer
MAX_VOCAB_SIZE = 2**21

# an assistant message's content is a str, or a list of parts of these types (a reply that used the tool)
ASSISTANT_PART_TYPES = ("text", "python", "python_output")


class RustBPETokenizer:
    """
    A tiktoken Encoding built from rustbpe's merges, plus the chat rendering.
    Why two libraries: training BPE needs pair counting and merging (rustbpe, ours); encoding with fixed merges
    is a different, simpler job that tiktoken does fast and on several threads. They agree because a tiktoken
    encoding IS its merge list: the rank of a token is the order in which its merge was learned, and tiktoken
    applies merges lowest rank first, as training learned them.
    """

    def __init__(self, encoding, bos_token="<|bos|>"):
        self.enc = encoding
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, buffer_size=8192):
        """
        Train BPE on an iterator of str; vocab_size counts the special tokens too.
        buffer_size: documents rustbpe pulls from the iterator at a time and splits and counts in parallel, outside
        the GIL. Only the distinct chunks and their counts are kept, so memory grows with the vocabulary of the
        text, not its length, and each merge updates a chunk once however often it occurs.
        """
        bpe_vocab_size = vocab_size - len(SPECIAL_TOKENS)
        if bpe_vocab_size < 256:
            raise ValueError(
                f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
            )
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, bpe_vocab_size, buffer_size=buffer_size, pattern=SPLIT_PATTERN)
        mergeable_ranks = {token_bytes: rank for token_bytes, rank in trainer.get_mergeable_ranks()}
        return cls.from_mergeable_ranks(trainer.get_pattern(), mergeable_ranks)

    @classmethod
    def from_mergeable_ranks(cls, pattern, mergeable_ranks):
        """A tokenizer from a split pattern and {token bytes: rank}, with SPECIAL_TOKENS appended."""
        # special tokens come right after however many BPE tokens training produced
        offset = len(mergeable_ranks)
        special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens))

    @classmethod
    def from_directory(cls, tokenizer_dir):
        """Load a tokenizer saved by save(): plain text and JSON, each checked against its record first."""
        config_path = os.path.join(tokenizer_dir, CONFIG_FILE)
        if not os.path.exists(config_path):
            if os.path.exists(os.path.join(tokenizer_dir, LEGACY_PICKLE_FILE)):
                raise ValueError(f"{os.path.join(tokenizer_dir, LEGACY_PICKLE_FILE)} is a tokenizer in the old pickle format, which "
                                 f"is no longer loaded (unpickling a file runs any code it holds). Convert it with "
                                 f"`python -m scripts.tok_train --convert-pickle {tokenizer_dir}` (it reads only plain data "
                                 f"from the pickle and refuses anything else), or retrain with `python -m scripts.tok_train`")
            raise FileNotFoundError(f"no tokenizer at {config_path}: train one first with `python -m scripts.tok_train`")
        # the config first: it is small, and says how many merges the ranks file must hold
        config = _load_tokenizer_file(config_path, read_tokenizer_config)
        ranks_path = os.path.join(tokenizer_dir, RANKS_FILE)
        mergeable_ranks = _load_tokenizer_file(ranks_path, read_mergeable_ranks)
        if len(mergeable_ranks) != config["bpe_vocab_size"]:
            raise DamagedArtifactError(f"{ranks_path} holds {len(mergeable_ranks)} tokens but {config_path} says "
                                       f"{config['bpe_vocab_size']}; retrain the tokenizer with `python -m scripts.tok_train`")
        return cls.from_mergeable_ranks(config["pattern"], mergeable_ranks)

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """An existing tiktoken encoding (e.g. "gpt2", "cl100k_base"), for comparisons; needs the network once."""
        encoding = tiktoken.get_encoding(tiktoken_name)
        return cls(encoding, bos_token="<|endoftext|>")  # GPT-2/GPT-4's document separator plays the BOS role

    def save(self, tokenizer_dir):
        """Write the ranks, the config and token_bytes.pt atomically, each with its record (size, sha256) next to it."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        # tiktoken keeps what it was built from in private attributes; there is no public getter for them
        ranks = self.enc._mergeable_ranks
        write_recorded(os.path.join(tokenizer_dir, RANKS_FILE), lambda f: f.write(format_mergeable_ranks(ranks)), record_beside=True)
        config = {"pattern": self.enc._pat_str, "vocab_size": self.get_vocab_size(),
                  "special_tokens": {name: self.encode_special(name) for name in SPECIAL_TOKENS}}
        write_recorded(os.path.join(tokenizer_dir, CONFIG_FILE), lambda f: f.write(json.dumps(config, indent=2).encode()),
                       record_beside=True)
        token_bytes = self.compute_token_bytes()
        write_recorded(os.path.join(tokenizer_dir, "token_bytes.pt"), lambda f: torch.save(token_bytes, f), record_beside=True)

    def compute_token_bytes(self):
        """
        Byte length of every token id (0 for special tokens), from the raw bytes, never a str round trip
        (a token can hold part of a UTF-8 character, which decodes to a 3-byte replacement character).
        Used by bits per byte (nanochat/loss_eval.py); the 0s leave special tokens out of it.
        """
        lengths = [0] * self.get_vocab_size()
        for token_bytes, rank in self.enc._mergeable_ranks.items():
            lengths[rank] = len(token_bytes)
        return torch.tensor(lengths, dtype=torch.int32)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return self.enc.special_tokens_set

    def id_to_token(self, token_id):
        # errors="replace": a token can be part of a multi-byte UTF-8 character, which alone is not valid text
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def encode_special(self, text):
        return self.enc.encode_single_token(text)

    def get_bos_token_id(self):
        return self.bos_token_id

    def _as_id(self, token):
        # prepend/append take an id or a special token's name ("<|bos|>")
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Encode a str (-> list of ids) or a list of str (-> list of lists, on num_threads threads)."""
        prefix = [self._as_id(prepend)] if prepend is not None else []
        suffix = [self._as_id(append)] if append is not None else []
        # encode_ordinary: text that happens to contain "<|assistant_end|>" stays plain bytes, so a user
        # cannot inject control tokens into the conversation by typing them
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text) + suffix
        if isinstance(text, list):
            batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [prefix + ids + suffix for ids in batch]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def decode(self, ids):
        # invalid UTF-8 (a reply cut mid-character) decodes with U+FFFD replacement characters, never an error
        return self.enc.decode(ids)

    def render_conversation(self, conversation, max_tokens=2048, train_on="assistant"):
        """
        Tokenize a conversation for training: returns (ids, mask), mask 1 on the tokens that are targets.
        train_on="assistant" (SFT): only what the assistant must learn to produce (its text, its tool calls,
        <|assistant_end|>). train_on="all" (midtraining, which is still pretraining-like): the user's turns
        and the chat tokens too. Either way never <|bos|> and never the tool output (<|output_start|> ...
        <|output_end|>): the engine forces that in at inference, the model never has to produce it.
        Truncated to max_tokens. For a one-turn exchange the mask is:

            <|bos|> <|user_start|> Hi <|user_end|> <|assistant_start|> Hello <|assistant_end|>
               0          0         0      0               0             1           1          train_on="assistant"
               0          1         1      1               1             1           1          train_on="all"
        """
        if train_on not in ("assistant", "all"):
            raise ValueError(f"train_on must be 'assistant' or 'all' (got {train_on!r})")
        # the mask of everything that is not the assistant's own output: the user turns and the chat tokens
        user_mask = 1 if train_on == "all" else 0
        messages = normalize_conversation(conversation)
        special = {name: self.encode_special(name) for name in SPECIAL_TOKENS}
        ids, mask = [], []

        def add(token_ids, mask_value):
            # one mask value per token id appended, so ids and mask stay the same length
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([mask_value] * len(token_ids))

        # mask values are per token, not per target: the loaders shift by one (target t+1 is kept where mask[t+1] == 1)
        add(self.get_bos_token_id(), 0)
        for message in messages:
            if message["role"] == "user":
                add(special["<|user_start|>"], user_mask)
                add(self.encode(message["content"]), user_mask)
                add(special["<|user_end|>"], user_mask)
                # normalize_conversation made the roles alternate, so anything else is the assistant
                continue
            # at inference the prompt ends with <|assistant_start|> (render_for_completion): the model never
            # has to produce it, so SFT does not train it
            add(special["<|assistant_start|>"], user_mask)
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                part_ids = self.encode(part["text"])
                if part["type"] == "text":
                    add(part_ids, 1)
                elif part["type"] == "python":
                    add(special["<|python_start|>"], 1)
                    add(part_ids, 1)
                    add(special["<|python_end|>"], 1)
                else:  # python_output: the engine writes it; training on it would teach the model to guess results
                    add(special["<|output_start|>"], 0)
                    add(part_ids, 0)
                    add(special["<|output_end|>"], 0)
            # trained: ending its turn is a decision the model must learn to make (else it rambles on)
            add(special["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Prompt the assistant's next reply: drop a trailing assistant message, end with <|assistant_start|>."""
        messages = normalize_conversation(conversation, allow_ending_with_user=True)
        # a task's conversation ends with the reference answer: it is dropped, so the model has to produce it
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ValueError("conversation needs at least one user message to complete")
        ids, _ = self.render_conversation(messages, max_tokens=10**9)  # never truncated: the end is what matters
        ids.append(self.encode_special("<|assistant_start|>"))
        return ids

    def visualize_tokenization(self, ids, mask):
        """Debug view: masked-in tokens in green, masked-out in red (ANSI colours, for a terminal)."""
        green, red, reset = "\033[92m", "\033[91m", "\033[0m"
        return "|".join(f"{green if m else red}{self.decode([i])}{reset}" for i, m in zip(ids, mask))


def normalize_conversation(conversation, allow_ending_with_user=True):
    """
    Validate a conversation and fold a leading system message into the first user message.
    Raises ValueError naming the problem: roles must alternate user, assistant, user, ...
    """
    if isinstance(conversation, dict):
        conversation = conversation.get("messages")
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("conversation must be a non-empty list of {'role', 'content'} messages")
    # Conversations come from datasets, from tasks and from the chat server's clients, so every field is checked:
    # a malformed one is a ValueError naming the message, never a KeyError deep inside rendering.
    messages = []
    for index, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index} must be a dict with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {index} has unknown role {role!r}; expected system, user or assistant")
        if role == "system" and index != 0:
            raise ValueError(f"message {index}: a system message may only come first")
        if role == "assistant" and isinstance(content, list):
            for part_index, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ASSISTANT_PART_TYPES or not isinstance(part.get("text"), str):
                    raise ValueError(
                        f"message {index} part {part_index}: each part must be {{'type': one of {ASSISTANT_PART_TYPES}, 'text': str}}"
                    )
        elif not isinstance(content, str):
            raise ValueError(f"message {index} ({role}) content must be a str")
        messages.append({"role": role, "content": content})
    # there is no system token: a system message becomes the top of the first user turn
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        system = messages.pop(0)
        messages[0] = {"role": "user", "content": system["content"] + "\n\n" + messages[0]["content"]}
    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"message {index} should be from the {expected} (user and assistant alternate, user first), got {message['role']!r}")
    if not allow_ending_with_user and messages[-1]["role"] != "assistant":
        raise ValueError("conversation must end with an assistant message")
    return messages


def format_mergeable_ranks(mergeable_ranks):
    """
    tiktoken's text format: one `base64(token bytes) rank` line per token, in rank order. base64 because a
    token is arbitrary bytes (a newline, half of a UTF-8 character), which a plain text line could not hold.
    """
    ordered = sorted(mergeable_ranks.items(), key=lambda item: item[1])
    return b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n" for token, rank in ordered)


def read_mergeable_ranks(path):
    """
    {token bytes: rank} from a RANKS_FILE, checked to be a usable byte-level BPE: ranks 0..n-1 in order and
    every single byte present (tiktoken cannot encode a byte it has no token for). We parse the 3-field format
    ourselves: tiktoken.load.load_tiktoken_bpe reads the same lines, but keeps a copy of any local file in a
    shared temp directory keyed by its path and returns that copy next time, so a retrained tokenizer at the
    same path would load stale merges.
    """
    ranks = {}
    # a rank is a token's id, and the order its merge was learned in: ids must be 0..n-1 with no gap,
    # or the special tokens that follow them would land on the wrong ids
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            fields = line.split()
            try:
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            except (IndexError, ValueError, binascii.Error):
                raise ValueError(f"line {line_number} is not `base64(token) rank`") from None
            if len(fields) != 2 or rank != len(ranks) or not token or token in ranks:
                raise ValueError(f"line {line_number}: expected a new token with rank {len(ranks)}")
            if rank >= MAX_VOCAB_SIZE:
                raise ValueError(f"more than {MAX_VOCAB_SIZE:,} tokens")
            ranks[token] = rank
    missing = [byte for byte in range(256) if bytes([byte]) not in ranks]
    if missing:
        raise ValueError(f"{len(missing)} of the 256 single bytes have no token (e.g. {missing[0]})")
    return ranks


def read_tokenizer_config(path):
    """The CONFIG_FILE as a dict, checked: our special tokens, right after the BPE tokens, and a pattern."""
    config = read_json(path, required_keys=("pattern", "vocab_size", "special_tokens"))
    vocab_size, special, pattern = config["vocab_size"], config["special_tokens"], config["pattern"]
    if not isinstance(vocab_size, int) or not len(SPECIAL_TOKENS) + 256 <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer from {len(SPECIAL_TOKENS) + 256} to {MAX_VOCAB_SIZE:,} (got {vocab_size!r})")
    bpe_vocab_size = vocab_size - len(SPECIAL_TOKENS)
    expected = {name: bpe_vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}
    if special != expected:
        raise ValueError(f"special_tokens must be {expected} (got {special!r})")
    if not isinstance(pattern, str) or not pattern or len(pattern) > 10_000:
        raise ValueError("pattern must be a non-empty string (the regex that splits text before merging)")
    return {"pattern": pattern, "bpe_vocab_size": bpe_vocab_size}


def _load_tokenizer_file(path, load):
    """load(path) once the file matches its record; any damage is reported with the fix."""
    try:
        return load_checked(path, read_sidecar(path), load)
    except DamagedArtifactError as e:
        raise DamagedArtifactError(f"{e}; retrain the tokenizer with `python -m scripts.tok_train` "
                                   f"(with the same flags as before, so the models trained with it still match)") from None


def _read_token_bytes(path, device):
    # weights_only: tensors and plain data only, so a planted file cannot run code when unpickled
    token_bytes = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(token_bytes, torch.Tensor) or token_bytes.ndim != 1:
        raise ValueError(f"expected a 1-D tensor of byte lengths, found {type(token_bytes).__name__}")
    return token_bytes


def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer():
    return RustBPETokenizer.from_directory(get_tokenizer_dir())


def get_token_bytes(device="cpu"):
    """The byte length of every token id, an int32 tensor [vocab_size]: what bits per byte divides by."""
    path = os.path.join(get_tokenizer_dir(), "token_bytes.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: train the tokenizer first with `python -m scripts.tok_train`")
    return _load_tokenizer_file(path, lambda path: _read_token_bytes(path, device))
