"""
The loaders that turn documents and conversations into training batches.

PretrainLoader reads this rank's stride of parquet row groups, tokenizes documents in batches on the
tokenizer's threads, and packs them into rows of seq_len+1 tokens. ConversationLoader (midtraining)
packs rendered conversations the same way. SFTLoader puts one conversation per row, padded.

BOS-aligned best-fit packing: every row starts with a document's <|bos|>, so the model never sees a
row that begins mid-document without context. A row is filled with whole documents, always taking
the longest document in the buffer that still fits in the space left; only when no document fits is
one cropped (the shortest, so the fewest tokens are thrown away) to fill the row exactly. The cropped
remainder is dropped rather than carried over, because it would start a row without a BOS.

Exact resume: a loader's whole state is where its stream is and which documents sit in the buffer, by
location. state_dict() records that; a loader built with resume_state re-reads and re-tokenizes those
documents and then yields exactly the batches the original would have yielded.

Measured (dev/BENCHMARKS.md, "Pretraining data loader"): on one core the pretraining loader produces
~1.1-1.3M tokens/s, about 10x what one H100 rank consumes at depth 20, so it runs inline in the training
process with no worker processes; best-fit cropping throws away 2.8% of the tokens at T=512 and 1.0% at
T=2048 (longer rows leave more room for whole documents).

Every batch is (inputs, targets), two int64 tensors [batch_size, seq_len]; a target of -1 is ignored by
the loss (a masked chat token, or padding).
"""
import bisect
import itertools
import os

import numpy as np
import torch

from nanochat.common import get_dist_info, logger
from nanochat.dataset import iter_row_groups, open_parquet, read_row_group, split_files


class EndOfSplit(Exception):
    """A single-pass loader has read every document of its split."""


def resolve_ranks(rank, world_size):
    """The given rank and world size, or torchrun's when either is None."""
    if rank is None or world_size is None:
        _, rank, _, world_size = get_dist_info()
    return rank, world_size


def render_at(dataset, index, tokenizer, max_tokens, train_on="assistant"):
    """(ids, mask) of conversation `index` of dataset (tokenizer.render_conversation); a malformed one names its index."""
    try:
        return tokenizer.render_conversation(dataset[index], max_tokens=max_tokens, train_on=train_on)
    except ValueError as error:
        raise ValueError(f"conversation {index} of the training data is malformed: {error}") from None


def to_device(inputs, targets, device):
    """Move a batch to the training device (CPU: no copy at all)."""
    if device.type == "cuda":
        # pinned memory lets the copy run asynchronously while the GPU works on the previous step
        return (inputs.pin_memory().to(device, non_blocking=True), targets.pin_memory().to(device, non_blocking=True))
    return inputs.to(device), targets.to(device)


class BestFitPacker:
    """
    The packing buffer shared by the pretraining and midtraining loaders. Subclasses implement refill()
    (add documents with add_document until the buffer holds buffer_size, or raise EndOfSplit when a
    single-pass loader has nothing left). A document may carry a loss mask (0 = not a target).

    An example, a row of 12 tokens and documents of 9, 5, 4 and 3 tokens in the buffer: 9 fits, leaving 3;
    the longest that fits in 3 is the 3: the row is full and nothing was cropped. Had there been no 3, the
    shortest document (the 4) would have been cropped to 3 tokens, losing 1.
    """
    # True for loaders whose documents carry loss masks
    has_masks = False

    def __init__(self, batch_size, seq_len, device, buffer_size):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive (got {batch_size}, {seq_len})")
        self.batch_size, self.seq_len, self.device, self.buffer_size = batch_size, seq_len, torch.device(device), buffer_size
        # The document buffer, kept sorted by (length, arrival number) so best-fit is a binary search.
        # The arrival number breaks ties deterministically, which exact resume depends on.
        # A bigger buffer offers more lengths to choose from, so rows close with fewer crops; the price is
        # memory, and the documents a resume must re-read.
        self.keys = []  # sorted (num_tokens, arrival)
        self.docs = {}  # arrival -> (tokens, location)
        self.masks = {}  # arrival -> loss mask, for documents that have one
        # location: where the document came from, enough to read it again on resume (the loader decides its form)
        self.arrivals = itertools.count()
        self.tokens_emitted, self.tokens_cropped = 0, 0

    def add_document(self, tokens, location, mask=None):
        # insort keeps keys sorted: O(log n) to find the spot, O(n) to shift the list, cheap next to tokenizing
        arrival = next(self.arrivals)
        self.docs[arrival] = (tokens, location)
        if mask is not None:
            self.masks[arrival] = mask
        bisect.insort(self.keys, (len(tokens), arrival))

    def buffered_locations(self):
        """Where each buffered document came from, in arrival order: re-adding them in this order on resume
        hands out the same arrival numbers, hence the same tie-breaks, as the run that saved them."""
        return [self.docs[arrival][1] for arrival in sorted(self.docs)]

    def take(self, key_index):
        """Remove the document at keys[key_index] from the buffer -> (tokens, mask or None)."""
        _, arrival = self.keys.pop(key_index)
        return self.docs.pop(arrival)[0], self.masks.pop(arrival, None)

    def next_row(self, row, mask_row=None):
        """Fill row (a numpy array of seq_len+1) with whole documents, best fit first, cropping only when nothing fits."""
        position, capacity = 0, len(row)
        while position < capacity:
            # topped up before every pick, not once per row: each choice sees a full buffer
            try:
                self.refill()
            except EndOfSplit:
                if not self.keys:
                    raise StopIteration from None  # a single pass is over; the partial row is dropped
            space = capacity - position
            # the last key <= (space, inf) is the longest buffered document that still fits (latest arrival on ties)
            fits = bisect.bisect_right(self.keys, (space, float("inf"))) - 1
            if fits >= 0:
                tokens, mask = self.take(fits)
            else:  # nothing fits: crop the shortest document, losing as little as possible
                tokens, mask = self.take(0)
                self.tokens_cropped += len(tokens) - space
                tokens, mask = tokens[:space], mask[:space] if mask is not None else None
            row[position:position + len(tokens)] = tokens
            if mask_row is not None:
                mask_row[position:position + len(tokens)] = 1 if mask is None else mask
            position += len(tokens)
        self.tokens_emitted += capacity

    def __iter__(self):
        return self

    def __next__(self):
        """(inputs, targets), int64 [batch_size, seq_len] each, on the device; StopIteration when a single pass ends."""
        # np.empty, not zeros: next_row writes every position of a row (and of its mask)
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        masks = np.empty_like(rows) if self.has_masks else None
        for i, row in enumerate(rows):
            self.next_row(row, masks[i] if masks is not None else None)
        # rows hold seq_len+1 tokens: inputs are the first seq_len, targets the same tokens shifted by one.
        # The copies make each tensor contiguous and its own memory (torch.from_numpy shares the array's),
        # so masking the targets cannot touch the inputs.
        targets = rows[:, 1:].copy()
        if masks is not None:
            targets[masks[:, 1:] == 0] = -1  # masked tokens are inputs, never targets
        return to_device(torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(targets), self.device)

    @property
    def cropped_fraction(self):
        """Fraction of the documents' tokens thrown away by cropping, so far on this rank."""
        total = self.tokens_emitted + self.tokens_cropped
        return self.tokens_cropped / total if total else 0.0


class PretrainLoader(BestFitPacker):
    """
    Pretraining batches from the parquet shards. single_pass=True reads the split once and then stops
    (StopIteration), which is what an evaluation wants; otherwise it loops over the split in epochs.
    """

    def __init__(self, tokenizer, batch_size, seq_len, split, device="cpu", resume_state=None,
                 rank=None, world_size=None, buffer_size=1000, tokenizer_threads=4, data_dir=None, single_pass=False):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val' (got {split!r})")
        super().__init__(batch_size, seq_len, device, buffer_size)
        rank, world_size = resolve_ranks(rank, world_size)
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.split, self.single_pass = split, single_pass
        self.rank, self.world_size = rank, world_size
        self.tokenizer_threads, self.data_dir = tokenizer_threads, data_dir
        # names, kept in the state: a resume into a different set of shards is refused rather than silently
        # mapping the saved (file_index, row_group) positions onto other files
        self.file_names = [os.path.basename(f) for f in split_files(split, data_dir)]
        # cursor: (file_index, row_group) last read, None at an epoch's start
        self.epoch, self.cursor = 0, None
        self.documents_this_epoch = 0
        # the generator over row groups, (re)made lazily from the cursor: after a resume, or at an epoch's start
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
            # one row group per call: the loop body returns at once, it only reads the next item or finds none
            for file_index, row_group, texts in self.stream:
                self.cursor = (file_index, row_group)
                self.documents_this_epoch += len(texts)
                return file_index, row_group, texts
            if self.single_pass:
                raise EndOfSplit
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
        # a whole row group at once: tiktoken's batch encode runs on several threads outside the GIL.
        # Each document gets <|bos|> in front, which is what makes every packed row start at a document's start.
        token_lists = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)
        for tokens, location in zip(token_lists, locations):
            self.add_document(tokens, location)

    def refill(self):
        # never empty (buffer_size 0 still holds one): a row always needs a document
        while len(self.keys) < max(self.buffer_size, 1):
            # a location is (file, row group, index in it): enough to read exactly that document again
            file_index, row_group, texts = self.next_row_group()
            self.add_documents(texts, [(file_index, row_group, i) for i in range(len(texts))])

    # ------------------------------------------------------------------
    # exact resume

    def state_dict(self):
        """A plain, JSON-able dict: where the stream is, and which documents are waiting in the buffer."""
        buffered = self.buffered_locations()
        return {
            "split": self.split, "rank": self.rank, "world_size": self.world_size, "files": self.file_names,
            "epoch": self.epoch, "cursor": list(self.cursor) if self.cursor else None,
            "documents_this_epoch": self.documents_this_epoch,
            "buffer": [list(location) for location in buffered],
            "tokens_emitted": self.tokens_emitted, "tokens_cropped": self.tokens_cropped,
        }

    def load_state(self, state):
        """Continue from a state_dict(): same split, ranks and files, or a ValueError saying what differs."""
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


class ConversationLoader(BestFitPacker):
    """
    Midtraining batches: conversations rendered in the chat format and packed BOS-aligned like
    pretraining documents (each starts with <|bos|>). Rank r takes conversations r, r+W, r+2W, ... of the
    dataset (any object with len() and [index] -> conversation, e.g. a TaskMixture). Which tokens are
    targets is the tokenizer's rule for train_on (render_conversation). single_pass=True stops after
    one pass (evaluation); otherwise passes repeat, each counted as an epoch.
    """
    has_masks = True

    def __init__(self, dataset, tokenizer, batch_size, seq_len, device="cpu", resume_state=None, rank=None, world_size=None,
                 buffer_size=100, single_pass=False, train_on="all"):
        super().__init__(batch_size, seq_len, device, buffer_size)
        rank, world_size = resolve_ranks(rank, world_size)
        if len(dataset) <= rank:
            raise ValueError(f"rank {rank} gets no conversations: the dataset has {len(dataset)}, fewer than the {world_size} ranks")
        self.dataset, self.tokenizer, self.train_on = dataset, tokenizer, train_on
        self.rank, self.world_size, self.single_pass = rank, world_size, single_pass
        # next_index: the next conversation this rank takes; ranks start at their own index and stride by W
        self.epoch, self.next_index = 0, rank
        if resume_state is not None:
            self.load_state(resume_state)

    def render(self, index):
        # whole, not truncated to a row: a long conversation must not look like a perfect fit to best-fit packing
        ids, mask = render_at(self.dataset, index, self.tokenizer, max_tokens=10**9, train_on=self.train_on)
        return ids, np.array(mask, dtype=np.int64)

    def refill(self):
        while len(self.keys) < max(self.buffer_size, 1):
            # rank r's conversations are r, r+W, r+2W, ...; each epoch starts over at r, in the same order
            if self.next_index >= len(self.dataset):
                if self.single_pass:
                    raise EndOfSplit
                self.epoch, self.next_index = self.epoch + 1, self.rank
                logger.info(f"rank {self.rank}: conversations exhausted, starting epoch {self.epoch}")
            ids, mask = self.render(self.next_index)
            # location (epoch, index): the index is what a resume renders again
            self.add_document(ids, (self.epoch, self.next_index), mask)
            self.next_index += self.world_size

    @property
    def epoch_progress(self):
        """Epochs done so far, fractional (conversations taken into the buffer / dataset size)."""
        return self.epoch + self.next_index / len(self.dataset)

    def state_dict(self):
        """JSON-able: the next conversation to take, and which conversations wait in the buffer."""
        return {"rank": self.rank, "world_size": self.world_size, "num_conversations": len(self.dataset),
                "epoch": self.epoch, "next_index": self.next_index, "buffer": [list(location) for location in self.buffered_locations()],
                "tokens_emitted": self.tokens_emitted, "tokens_cropped": self.tokens_cropped}

    def load_state(self, state):
        """Continue from a state_dict(): same ranks and dataset size, or a ValueError saying what differs."""
        check_same(state, {"rank": self.rank, "world_size": self.world_size, "num_conversations": len(self.dataset)})
        self.epoch, self.next_index = state["epoch"], state["next_index"]
        self.tokens_emitted, self.tokens_cropped = state["tokens_emitted"], state["tokens_cropped"]
        for epoch, index in state["buffer"]:  # rendering is deterministic: the buffer comes back as it was
            ids, mask = self.render(index)
            self.add_document(ids, (epoch, index), mask)


class SFTLoader:
    """
    SFT batches: one conversation per row, right-padded, targets only where the tokenizer's mask says the
    assistant must learn (never user text, tool output or padding: those targets are -1).
    The rows of one optimizer step (batch_size x grad_accum_steps x world_size conversations, in dataset
    order) are sorted by length before they are dealt out to micro-batches and ranks, so rows of similar
    length share a micro-batch and little is padded. The loss is normalised over the whole step
    (training.train_step), so this reordering does not change the gradient.
    """

    def __init__(self, dataset, tokenizer, batch_size, max_seq_len, grad_accum_steps=1, device="cpu", resume_state=None,
                 rank=None, world_size=None, single_pass=False, pad_multiple=8):
        rank, world_size = resolve_ranks(rank, world_size)
        if len(dataset) == 0:
            raise ValueError("the SFT dataset is empty")
        self.dataset, self.tokenizer = dataset, tokenizer
        self.batch_size, self.max_seq_len, self.grad_accum_steps = batch_size, max_seq_len, grad_accum_steps
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        self.single_pass, self.pad_multiple = single_pass, pad_multiple
        self.rows_per_step = batch_size * grad_accum_steps * world_size
        # any id would do: padded positions sit after a row's last real token and their targets are -1, so under
        # causal attention nothing real ever attends to them and no loss is computed on them
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")
        self.micro_batches_taken = 0
        self.tokens_total, self.tokens_padded = 0, 0
        # (step, its rendered rows sorted by length): a step's rows are rendered once, then dealt out over its
        # grad_accum_steps micro-batches
        self._step_rows = (None, None)
        # The whole position is one counter: which micro-batch comes next. Steps map to fixed dataset indexes
        # (step s takes conversations s*rows_per_step, ...), so nothing else needs saving to resume exactly.
        if resume_state is not None:
            check_same(resume_state, {"world_size": world_size, "rows_per_step": self.rows_per_step, "num_conversations": len(dataset)})
            self.micro_batches_taken = resume_state["micro_batches_taken"]
            self.tokens_total, self.tokens_padded = resume_state["tokens_total"], resume_state["tokens_padded"]

    def rows_of_step(self, step):
        """The rendered rows of optimizer step `step`, as (num_tokens, position, ids, mask), shortest first."""
        if self._step_rows[0] != step:
            first = step * self.rows_per_step
            indexes = range(first, first + self.rows_per_step)
            # a single pass stops at the dataset's end: the last step may be short (even empty on some ranks)
            if self.single_pass:
                indexes = range(first, min(first + self.rows_per_step, len(self.dataset)))
            rows = []
            for position, index in enumerate(indexes):
                # index wraps around the dataset: the next epoch. max_seq_len + 1 tokens: a row of n tokens gives
                # n - 1 (input, target) pairs, so this fills the context exactly
                ids, mask = render_at(self.dataset, index % len(self.dataset), self.tokenizer, max_tokens=self.max_seq_len + 1)
                rows.append((len(ids), position, ids, mask))
            # sorted by length, ties by position in the dataset: the same order on every rank and every rerun
            self._step_rows = (step, sorted(rows, key=lambda row: row[:2]))
        return self._step_rows[1]

    def __iter__(self):
        return self

    def __next__(self):
        """(inputs, targets) of this rank's next micro-batch, [rows, length]: length varies from batch to batch."""
        step, micro_step = divmod(self.micro_batches_taken, self.grad_accum_steps)
        # which slice of the sorted rows is this rank's micro-batch: the step's rows are cut into
        # grad_accum_steps x world_size slices of batch_size, and every rank computes the same cut
        chunk = micro_step * self.world_size + self.rank
        rows = self.rows_of_step(step)[chunk * self.batch_size:(chunk + 1) * self.batch_size]
        if not rows:
            raise StopIteration  # single pass: every conversation has been served
        self.micro_batches_taken += 1
        # padded to the longest row of this micro-batch only (not to max_seq_len): sorting made them similar
        length = max(row[0] for row in rows) - 1
        # rounded up to a multiple of pad_multiple: fewer distinct shapes to compile (-(-a // b) is ceil(a / b))
        length = min(-(-length // self.pad_multiple) * self.pad_multiple, self.max_seq_len)
        inputs = np.full((len(rows), length), self.pad_id, dtype=np.int64)
        targets = np.full((len(rows), length), -1, dtype=np.int64)
        for i, (num_tokens, _, ids, mask) in enumerate(rows):
            ids, mask = np.array(ids), np.array(mask)
            # the mask is per token, so the target at t (token t+1) is kept where mask[t+1] is 1
            inputs[i, :num_tokens - 1] = ids[:-1]
            targets[i, :num_tokens - 1] = np.where(mask[1:] == 1, ids[1:], -1)
        # what padded_fraction reports: the positions computed on vs those that held a real token
        self.tokens_total += inputs.size
        self.tokens_padded += inputs.size - sum(row[0] - 1 for row in rows)
        return to_device(torch.from_numpy(inputs), torch.from_numpy(targets), self.device)

    @property
    def padded_fraction(self):
        """Share of the positions processed so far that were padding: compute spent on nothing (~23% in the CPU speedrun)."""
        return self.tokens_padded / self.tokens_total if self.tokens_total else 0.0

    @property
    def epoch_progress(self):
        """Epochs done so far, fractional, counting whole optimizer steps."""
        return self.micro_batches_taken // self.grad_accum_steps * self.rows_per_step / len(self.dataset)

    def state_dict(self):
        """JSON-able: the settings a resume must match, and the one counter that is the position."""
        return {"world_size": self.world_size, "rows_per_step": self.rows_per_step, "num_conversations": len(self.dataset),
                "micro_batches_taken": self.micro_batches_taken, "tokens_total": self.tokens_total, "tokens_padded": self.tokens_padded}


def check_same(state, expected):
    """A saved loader state only resumes exactly into a loader over the same data and ranks."""
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(f"the loader state was saved with {key}={state.get(key)!r} but this loader has {key}={value!r}; "
                             f"exact resume needs the same data, batch settings and ranks")
