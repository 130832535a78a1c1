"""
The pretraining loader: BOS-aligned best-fit packing invariants, disjoint ranks, epochs, exact resume,
and clear errors. Most tests use a byte-level tokenizer (ids 0..255, BOS 256) so tokens decode back to
the exact documents; the real tokenizer is exercised on the embedded sample.
"""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import PretrainLoader
from nanochat.dataset import VAL_SHARD, shard_name

BOS = 256


class ByteTokenizer:
    """Same encode/get_bos_token_id interface as RustBPETokenizer; one token per UTF-8 byte."""

    def get_bos_token_id(self):
        return BOS

    def encode(self, texts, prepend=None, num_threads=4):
        return [([prepend] if prepend is not None else []) + list(text.encode("utf-8")) for text in texts]


def make_docs(shard, num_docs, rng):
    # every document starts with a unique id, so even a cropped piece says where it came from
    return [f"<{shard}:{i}>" + "".join(rng.choice(list("abcdefgh "), size=int(rng.integers(0, 120)))) for i in range(num_docs)]


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """Three train shards and the val shard, row groups of 8 documents of 5-125 bytes."""
    monkeypatch.delenv("NANOCHAT_DATA", raising=False)
    rng = np.random.default_rng(0)
    for shard, num_docs in [(0, 40), (1, 24), (2, 33), (VAL_SHARD, 16)]:
        pq.write_table(pa.table({"text": make_docs(shard, num_docs, rng)}), tmp_path / shard_name(shard), row_group_size=8)
    return str(tmp_path)


def all_docs(data_dir, split="train"):
    from nanochat.dataset import parquets_iter_batched
    return [t for batch in parquets_iter_batched(split, data_dir=data_dir) for t in batch]


def segments(row):
    """Split a row of token ids at each BOS into documents (or document pieces)."""
    starts = [i for i, t in enumerate(row) if t == BOS] + [len(row)]
    return [bytes(row[a + 1:b]).decode("utf-8", errors="replace") for a, b in zip(starts, starts[1:])]


def rows_of(batch):
    inputs, targets = batch
    return torch.cat([inputs, targets[:, -1:]], dim=1).tolist()


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (x1, y1), (x2, y2) in zip(a, b):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_rows_are_bos_aligned_and_only_crops_lose_tokens(data_dir):
    loader = PretrainLoader(ByteTokenizer(), batch_size=3, seq_len=63, split="train", rank=0, world_size=1,
                            buffer_size=20, data_dir=data_dir)
    docs = {doc[:doc.index(">") + 1]: doc for doc in all_docs(data_dir)}
    seen = set()
    for _ in range(12):  # less than an epoch: every document may appear at most once
        inputs, targets = next(loader)
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == targets.shape == (3, 63)
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row in rows_of((inputs, targets)):
            assert row[0] == BOS
            pieces = segments(row)
            for k, piece in enumerate(pieces):
                doc_id = piece[:piece.index(">") + 1] if ">" in piece else None
                if k < len(pieces) - 1:  # only the last piece of a row may be a crop
                    assert docs[doc_id] == piece
                else:
                    assert doc_id is None or docs[doc_id].startswith(piece)
                if doc_id:
                    assert doc_id not in seen, "a document was emitted twice within one epoch"
                    seen.add(doc_id)
    assert loader.epoch == 0
    # token accounting: every token of the row groups read so far was emitted, cropped, or is still
    # waiting in the buffer (documents cropped to fewer bytes than their id can't be named, hence totals)
    buffered = {bytes(tokens[1:]).decode()[:bytes(tokens[1:]).decode().index(">") + 1] for tokens, _ in loader.docs.values()}
    file_index, row_group = loader.cursor
    read_ids = {f"<{shard}:{i}>" for shard, n in [(0, 40), (1, 24), (2, 33)][:file_index] for i in range(n)}
    read_ids |= {f"<{file_index}:{i}>" for i in range(8 * (row_group + 1)) if f"<{file_index}:{i}>" in docs}
    assert not seen & buffered and seen | buffered <= read_ids
    read_tokens = sum(len(docs[k].encode()) + 1 for k in read_ids)
    buffered_tokens = sum(len(tokens) for tokens, _ in loader.docs.values())
    assert loader.tokens_emitted + loader.tokens_cropped + buffered_tokens == read_tokens
    assert loader.tokens_emitted == 12 * 3 * 64
    assert 0 < loader.cropped_fraction < 0.5


def test_best_fit_takes_the_longest_document_that_fits_and_crops_only_when_none_fits(data_dir):
    loader = PretrainLoader(ByteTokenizer(), batch_size=1, seq_len=8, split="train", rank=0, world_size=1,
                            buffer_size=0, data_dir=data_dir)  # buffer_size=0: only the documents we add
    loader.add_documents(["aaa", "bbbbb", "c", "dd"], [(0, 0, i) for i in range(4)])  # 4, 6, 2, 3 tokens with BOS
    row = np.zeros(9, dtype=np.int64)
    loader.next_row(row)  # best fit: 6 (bbbbb), then 3 (dd) fills the 9 exactly; first-fit would crop
    assert segments(row.tolist()) == ["bbbbb", "dd"] and loader.tokens_cropped == 0
    loader.next_row(row)  # aaa (4) + c (2), then 3 tokens left and nothing in the buffer: refill from the shards
    assert segments(row.tolist())[:2] == ["aaa", "c"]
    loader2 = PretrainLoader(ByteTokenizer(), batch_size=1, seq_len=8, split="train", rank=0, world_size=1,
                             buffer_size=0, data_dir=data_dir)
    loader2.add_documents(["x" * 20, "y" * 30], [(0, 0, 0), (0, 0, 1)])
    loader2.next_row(row)  # nothing fits: crop the shortest document to the row
    assert segments(row.tolist()) == ["x" * 8] and loader2.tokens_cropped == 21 - 9
    assert len(loader2.keys) == 1  # the longer document is still waiting


def test_ranks_read_disjoint_documents(data_dir):
    seen = []
    for rank in range(2):
        loader = PretrainLoader(ByteTokenizer(), batch_size=2, seq_len=31, split="train", rank=rank, world_size=2,
                                buffer_size=4, data_dir=data_dir)
        ids = set()
        for _ in range(8):
            for row in rows_of(next(loader)):
                ids.update(piece[:piece.index(">") + 1] for piece in segments(row) if ">" in piece)
        assert loader.epoch == 0
        seen.append(ids)
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_resume_is_exact_mid_epoch(data_dir):
    make = lambda state=None: PretrainLoader(ByteTokenizer(), batch_size=2, seq_len=47, split="train", rank=1,
                                             world_size=2, buffer_size=10, data_dir=data_dir, resume_state=state)
    loader = make()
    take(loader, 5)
    state = json.loads(json.dumps(loader.state_dict()))  # must survive a trip through a checkpoint file
    expected = take(loader, 10)
    resumed = make(state)
    assert_same_batches(take(resumed, 10), expected)
    assert resumed.cropped_fraction == loader.cropped_fraction


def test_new_epoch_starts_when_data_runs_out_and_resume_is_exact_across_it(data_dir, caplog):
    make = lambda state=None: PretrainLoader(ByteTokenizer(), batch_size=4, seq_len=63, split="val", rank=0,
                                             world_size=1, buffer_size=6, data_dir=data_dir, resume_state=state)
    loader = make()
    states, batches = [], []
    with caplog.at_level(logging.INFO, logger="nanochat"):
        for _ in range(12):  # the val shard holds ~1.2k tokens: several epochs
            states.append(loader.state_dict())
            batches.append(next(loader))
    assert loader.epoch >= 2
    assert "starting epoch 1" in caplog.text
    epochs = [s["epoch"] for s in states]
    boundary = epochs.index(1)  # first state saved after the epoch rolled over
    for start in (boundary - 1, boundary):  # resume just before and just after the boundary
        assert_same_batches(take(make(states[start]), 12 - start), batches[start:])


def test_state_from_other_ranks_or_files_is_rejected(data_dir):
    loader = PretrainLoader(ByteTokenizer(), 1, 15, "train", rank=0, world_size=2, data_dir=data_dir)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        PretrainLoader(ByteTokenizer(), 1, 15, "train", rank=0, world_size=1, data_dir=data_dir, resume_state=state)
    state["files"] = state["files"][:-1]
    with pytest.raises(ValueError, match="files changed"):
        PretrainLoader(ByteTokenizer(), 1, 15, "train", rank=0, world_size=2, data_dir=data_dir, resume_state=state)


def test_corrupt_shard_error_names_the_file(data_dir):
    path = f"{data_dir}/{shard_name(1)}"
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    loader = PretrainLoader(ByteTokenizer(), 4, 63, "train", rank=0, world_size=1, buffer_size=50, data_dir=data_dir)
    with pytest.raises(RuntimeError, match=f"{shard_name(1)} is corrupt or truncated"):
        take(loader, 20)


def test_empty_corpus_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_DATA", raising=False)
    for shard in (0, VAL_SHARD):
        pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), tmp_path / shard_name(shard))
    loader = PretrainLoader(ByteTokenizer(), 1, 15, "train", rank=0, world_size=1, data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="got no data"):
        next(loader)


def test_rank_without_row_groups_is_a_clear_error(data_dir):
    # the val shard has 2 row groups: a third rank would get nothing
    loader = PretrainLoader(ByteTokenizer(), 1, 15, "val", rank=2, world_size=3, data_dir=data_dir)
    with pytest.raises(RuntimeError, match="rank 2 of 3 got no data"):
        next(loader)


def test_real_tokenizer_on_the_embedded_sample(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA", "sample")
    bos = tiny_tokenizer.get_bos_token_id()
    make = lambda state=None: PretrainLoader(tiny_tokenizer, batch_size=4, seq_len=128, split="val", rank=0,
                                             world_size=1, buffer_size=64, tokenizer_threads=2, resume_state=state)
    loader = make()
    take(loader, 3)
    state = loader.state_dict()
    expected = take(loader, 3)
    for inputs, targets in expected:
        assert (inputs[:, 0] == bos).all() and inputs.shape == (4, 128)
        assert int(inputs.max()) < tiny_tokenizer.get_vocab_size()
    first_piece = tiny_tokenizer.decode(rows_of(expected[0])[0][1:]).split("<|bos|>")[0]
    val_docs = all_docs(None, "val")
    assert len(first_piece) > 20 and any(doc.startswith(first_piece[:40]) for doc in val_docs)
    assert_same_batches(take(make(state), 3), expected)


TORCHRUN_SCRIPT = '''
import json, sys
import torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from test_dataloader import ByteTokenizer, rows_of, segments
from nanochat.common import compute_init, compute_cleanup
from nanochat.dataloader import PretrainLoader

_, rank, _, world_size, _ = compute_init("cpu")
loader = PretrainLoader(ByteTokenizer(), 2, 31, "train", buffer_size=4, data_dir=sys.argv[1])  # rank, world size from torchrun
ids = set()
for _ in range(6):
    for row in rows_of(next(loader)):
        ids.update(piece[:piece.index(">") + 1] for piece in segments(row) if ">" in piece)
gathered = [None] * world_size
dist.all_gather_object(gathered, (loader.rank, loader.world_size, sorted(ids)))
if rank == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(gathered, f)
compute_cleanup()
'''


@pytest.mark.slow
def test_torchrun_ranks_read_disjoint_documents(data_dir, tmp_path):
    script, result = tmp_path / "ranks.py", tmp_path / "ranks.json"
    script.write_text(TORCHRUN_SCRIPT)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), data_dir, str(result), tests_dir],
                          cwd=os.path.dirname(tests_dir), env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rank0, world0, ids0), (rank1, world1, ids1) = json.loads(result.read_text())
    assert (rank0, world0, rank1, world1) == (0, 2, 1, 2)
    assert ids0 and ids1 and not set(ids0) & set(ids1)


def test_single_pass_reads_each_document_at_most_once_then_stops(data_dir):
    """What evaluations use: a small val split is never looped (the old loader re-read it ~80 times per eval)."""
    from nanochat.loss_eval import evaluate_bpb

    loader = PretrainLoader(ByteTokenizer(), batch_size=2, seq_len=31, split="val", rank=0, world_size=1,
                            buffer_size=4, data_dir=data_dir, single_pass=True)
    batches = list(loader)  # ends by itself
    assert loader.epoch == 0 and batches
    ids_seen = [segment[:segment.index(">") + 1] for batch in batches for row in rows_of(batch) for segment in segments(row)
                if segment.startswith("<") and ">" in segment]
    assert len(ids_seen) == len(set(ids_seen))  # no document twice
    assert len(ids_seen) >= 12  # and most of the 16 val documents were read (only the last partial row is dropped)

    class UniformModel(torch.nn.Module):
        def forward(self, inputs, targets, loss_reduction="none"):
            return torch.full(targets.shape, 2.0)

    token_bytes = torch.ones(257, dtype=torch.long)
    # asking for 1,000 batches reads the one pass there is and stops; the same number as the batches above
    fresh = PretrainLoader(ByteTokenizer(), batch_size=2, seq_len=31, split="val", rank=0, world_size=1,
                           buffer_size=4, data_dir=data_dir, single_pass=True)
    assert evaluate_bpb(UniformModel(), fresh, 1000, token_bytes) == pytest.approx(2.0 / np.log(2), rel=1e-6)
    assert len(batches) * 64 <= fresh.tokens_emitted < (len(batches) + 1) * 64  # the dropped partial batch aside
