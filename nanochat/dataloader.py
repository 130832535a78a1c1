"""
The pretraining dataloader: reads this rank's stride of parquet row groups, tokenizes documents in
batches on the tokenizer's threads, and packs them into rows of seq_len+1 tokens.

BOS-aligned best-fit packing: every row starts with a document's <|bos|>, so the model never sees a
row that begins mid-document without context. A row is filled with whole documents, always taking
the longest document in the buffer that still fits in the space left; only when no document fits is
one cropped (the shortest, so the fewest tokens are thrown away) to fill the row exactly. The cropped
remainder is dropped rather than carried over, because it would start a row without a BOS.

Exact resume: the loader's whole state is (epoch, the last row group read, and which documents sit in
the buffer, by location). state_dict() records that; a loader built with resume_state re-reads and
re-tokenizes those documents and then yields exactly the batches the original would have yielded.
"""
import bisect
import itertools
import os

import numpy as np
import torch

from nanochat.common import get_dist_info, logger
from nanochat.dataset import iter_row_groups, open_parquet, read_row_group, split_files


class PretrainLoader:
    def __init__(self, tokenizer, batch_size, seq_len, split, device="cpu", resume_state=None,
                 rank=None, world_size=None, buffer_size=1000, tokenizer_threads=4, data_dir=None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val' (got {split!r})")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive (got {batch_size}, {seq_len})")
        if rank is None or world_size is None:
            _, rank, _, world_size = get_dist_info()
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.batch_size, self.seq_len, self.split = batch_size, seq_len, split
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.buffer_size, self.tokenizer_threads, self.data_dir = buffer_size, tokenizer_threads, data_dir
        self.file_names = [os.path.basename(f) for f in split_files(split, data_dir)]
        # The document buffer, kept sorted by (length, arrival number) so best-fit is a binary search.
        # The arrival number breaks ties deterministically, which exact resume depends on.
        self.keys = []  # sorted (num_tokens, arrival)
        self.docs = {}  # arrival -> (tokens, (file_index, row_group, doc_index))
        self.arrivals = itertools.count()
        self.epoch, self.cursor = 0, None  # cursor: (file_index, row_group) last read, None at an epoch's start
        self.documents_this_epoch = 0
        self.tokens_emitted, self.tokens_cropped = 0, 0
        self.stream = None
        if resume_state is not None:
            self.load_state(resume_state)

    # ------------------------------------------------------------------
    # the row-group stream

    def next_row_group(self):
        """(file_index, row_group, texts) of this rank's next row group, moving to a new epoch when the split runs out."""
        while True:
            if self.stream is None:
                self.stream = iter_row_groups(self.split, self.rank, self.world_size, self.data_dir, after=self.cursor)
            for file_index, row_group, texts in self.stream:
                self.cursor = (file_index, row_group)
                self.documents_this_epoch += len(texts)
                return file_index, row_group, texts
            if self.documents_this_epoch == 0:  # a whole pass gave nothing: looping again would spin forever
                raise RuntimeError(
                    f"rank {self.rank} of {self.world_size} got no data from the {self.split!r} split "
                    f"({len(self.file_names)} file(s) from {self.file_names[0]}): they hold no documents, or fewer row groups "
                    f"than there are ranks. "
                    f"Download more shards, or run on fewer ranks")
            self.epoch += 1
            self.cursor, self.stream, self.documents_this_epoch = None, None, 0
            logger.info(f"rank {self.rank}: {self.split} data exhausted, starting epoch {self.epoch}")

    def add_documents(self, texts, locations):
        token_lists = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)
        for tokens, location in zip(token_lists, locations):
            arrival = next(self.arrivals)
            self.docs[arrival] = (tokens, location)
            bisect.insort(self.keys, (len(tokens), arrival))

    def refill(self):
        while len(self.keys) < max(self.buffer_size, 1):  # never empty: a row always needs a document
            file_index, row_group, texts = self.next_row_group()
            self.add_documents(texts, [(file_index, row_group, i) for i in range(len(texts))])

    # ------------------------------------------------------------------
    # packing

    def take(self, key_index):
        _, arrival = self.keys.pop(key_index)
        return self.docs.pop(arrival)[0]

    def next_row(self, row):
        """Fill row (a numpy array of seq_len+1) with whole documents, best fit first, cropping only when nothing fits."""
        position, capacity = 0, len(row)
        while position < capacity:
            self.refill()
            space = capacity - position
            fits = bisect.bisect_right(self.keys, (space, float("inf"))) - 1
            if fits >= 0:
                tokens = self.take(fits)
            else:  # nothing fits: crop the shortest document, losing as little as possible
                tokens = self.take(0)
                self.tokens_cropped += len(tokens) - space
                tokens = tokens[:space]
            row[position:position + len(tokens)] = tokens
            position += len(tokens)
        self.tokens_emitted += capacity

    def __iter__(self):
        return self

    def __next__(self):
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for row in rows:
            self.next_row(row)
        inputs = torch.from_numpy(rows[:, :-1].copy())
        targets = torch.from_numpy(rows[:, 1:].copy())
        if self.device.type == "cuda":
            # pinned memory lets the copy run asynchronously while the GPU works on the previous step
            return (inputs.pin_memory().to(self.device, non_blocking=True),
                    targets.pin_memory().to(self.device, non_blocking=True))
        return inputs.to(self.device), targets.to(self.device)

    @property
    def cropped_fraction(self):
        """Fraction of the documents' tokens thrown away by cropping, so far on this rank."""
        total = self.tokens_emitted + self.tokens_cropped
        return self.tokens_cropped / total if total else 0.0

    # ------------------------------------------------------------------
    # exact resume

    def state_dict(self):
        """A plain, JSON-able dict: where the stream is, and which documents are waiting in the buffer."""
        buffered = [self.docs[arrival][1] for arrival in sorted(self.docs)]  # in arrival order
        return {
            "split": self.split, "rank": self.rank, "world_size": self.world_size, "files": self.file_names,
            "epoch": self.epoch, "cursor": list(self.cursor) if self.cursor else None,
            "documents_this_epoch": self.documents_this_epoch,
            "buffer": [list(location) for location in buffered],
            "tokens_emitted": self.tokens_emitted, "tokens_cropped": self.tokens_cropped,
        }

    def load_state(self, state):
        for key in ("split", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"the loader state was saved with {key}={state[key]!r} but this loader has {key}={getattr(self, key)!r}; "
                    f"exact resume needs the same split and ranks (start the data stream over with resume_state=None)")
        if state["files"] != self.file_names:
            raise ValueError(
                f"the {self.split} files changed since the loader state was saved ({len(state['files'])} then, "
                f"{len(self.file_names)} now); exact resume needs the same shards (or resume_state=None)")
        self.epoch, self.documents_this_epoch = state["epoch"], state["documents_this_epoch"]
        self.cursor = tuple(state["cursor"]) if state["cursor"] else None
        self.tokens_emitted, self.tokens_cropped = state["tokens_emitted"], state["tokens_cropped"]
        # Re-read the buffered documents from their row groups; tokenization is deterministic, and arrival
        # order is preserved, so the buffer (ties included) is exactly what it was.
        files = split_files(self.split, self.data_dir)
        by_row_group = {}
        for file_index, row_group, doc_index in state["buffer"]:
            by_row_group.setdefault((file_index, row_group), []).append(doc_index)
        for (file_index, row_group), doc_indices in by_row_group.items():  # dicts keep arrival order
            path = files[file_index]
            texts = read_row_group(open_parquet(path), path, row_group)
            self.add_documents([texts[i] for i in doc_indices], [(file_index, row_group, i) for i in doc_indices])
