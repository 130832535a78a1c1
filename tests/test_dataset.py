"""
Shard listing, splits, row-group striding, the embedded sample, and the downloader against a real HTTP
server on 127.0.0.1 that misbehaves on purpose (mid-transfer disconnects, 500s, 404s).
"""
import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.dataset import (SAMPLE_DIR, VAL_SHARD, download_shards, iter_row_groups, list_parquet_files,
                              parquets_iter_batched, shard_name, split_files)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_shard(path, docs, row_group_size=4):
    pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group_size)


def shard_bytes(index, num_docs=12):
    """A small valid shard whose documents name the shard they came from."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": [f"shard {index} doc {i} " + "word " * (i + 1) for i in range(num_docs)]}),
                   sink, row_group_size=4)
    return sink.getvalue().to_pybytes()


@pytest.fixture
def no_sample_override(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DATA", raising=False)


# -----------------------------------------------------------------------------
# the embedded sample

def test_embedded_sample_is_present_small_and_loads(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA", "sample")
    train, val = split_files("train"), split_files("val")
    assert [os.path.basename(f) for f in train + val] == ["train.parquet", "val.parquet"]
    assert os.path.exists(os.path.join(SAMPLE_DIR, "NOTICE"))
    total_bytes = sum(os.path.getsize(os.path.join(SAMPLE_DIR, f)) for f in os.listdir(SAMPLE_DIR))
    assert total_bytes <= 15e6
    texts = {}
    for split in ("train", "val"):
        parquet_file = pq.ParquetFile(split_files(split)[0])
        assert parquet_file.schema_arrow.names == ["text"]
        for i in range(parquet_file.num_row_groups - 1):  # the last row group holds the remainder
            assert 256 <= parquet_file.metadata.row_group(i).num_rows <= 1024
        texts[split] = [t for batch in parquets_iter_batched(split) for t in batch]
        assert all(isinstance(t, str) and t for t in texts[split])
    assert sum(map(len, texts["train"])) > 10e6  # enough real English to train a tokenizer on
    assert len(texts["val"]) >= 1000
    assert not set(texts["train"]) & set(texts["val"]), "a document is in both splits"


def test_sample_is_used_when_no_shards_were_downloaded(tmp_path, no_sample_override):
    assert list_parquet_files(str(tmp_path)) == [os.path.join(SAMPLE_DIR, "train.parquet"), os.path.join(SAMPLE_DIR, "val.parquet")]
    assert list_parquet_files(str(tmp_path / "does-not-exist"))[0].startswith(SAMPLE_DIR)


# -----------------------------------------------------------------------------
# downloaded shards: listing, the pinned val shard, striding, corrupt files

def make_data_dir(path, train_indices=(0, 1, 2), with_val=True):
    for index in list(train_indices) + ([VAL_SHARD] if with_val else []):
        with open(path / shard_name(index), "wb") as f:
            f.write(shard_bytes(index))
    return str(path)


def test_shards_are_preferred_and_val_is_the_pinned_last_shard(tmp_path, no_sample_override, monkeypatch):
    data_dir = make_data_dir(tmp_path)
    (tmp_path / (shard_name(3) + ".tmp123")).write_bytes(b"partial download")  # never listed
    assert [os.path.basename(f) for f in list_parquet_files(data_dir)] == [shard_name(i) for i in (0, 1, 2, VAL_SHARD)]
    assert split_files("val", data_dir) == [os.path.join(data_dir, shard_name(VAL_SHARD))]
    assert split_files("train", data_dir) == [os.path.join(data_dir, shard_name(i)) for i in (0, 1, 2)]
    monkeypatch.setenv("NANOCHAT_DATA", "sample")
    assert split_files("val", data_dir)[0].startswith(SAMPLE_DIR)


def test_missing_val_shard_is_a_clear_error_not_the_last_train_shard(tmp_path, no_sample_override):
    data_dir = make_data_dir(tmp_path, with_val=False)
    with pytest.raises(FileNotFoundError, match=shard_name(VAL_SHARD)):
        split_files("val", data_dir)
    with pytest.raises(ValueError, match="split must be"):
        split_files("test", data_dir)


def test_rank_strides_are_disjoint_and_cover_the_split(tmp_path, no_sample_override):
    data_dir = make_data_dir(tmp_path)
    everything = [t for batch in parquets_iter_batched("train", data_dir=data_dir) for t in batch]
    assert len(everything) == 36 and len(set(everything)) == 36
    per_rank = [[t for batch in parquets_iter_batched("train", rank, 3, data_dir) for t in batch] for rank in range(3)]
    assert all(per_rank)
    assert sorted(sum(per_rank, [])) == sorted(everything)
    # resuming just past a row group continues the same stride
    stream = list(iter_row_groups("train", 1, 2, data_dir))
    resumed = list(iter_row_groups("train", 1, 2, data_dir, after=stream[1][:2]))
    assert resumed == stream[2:]


def test_truncated_shard_is_named_in_the_error(tmp_path, no_sample_override):
    data_dir = make_data_dir(tmp_path)
    path = tmp_path / shard_name(1)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RuntimeError, match=f"{shard_name(1)} is corrupt or truncated"):
        list(parquets_iter_batched("train", data_dir=data_dir))


# -----------------------------------------------------------------------------
# the downloader, against a real HTTP server that fails in scripted ways

class ShardServer:
    """
    Serves shard_XXXXX.parquet on 127.0.0.1. script[name] is a list of what to do on successive requests:
    "ok", "500", "404", "disconnect" (announce the full length, send half, hang up),
    "stall" (send half, then hang). Past the end of the
    list it answers "ok". Every request is counted in hits[name].
    """

    def __init__(self, num_docs=12):
        self.script, self.hits, self.num_docs = {}, {}, num_docs
        self.stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.hits[name] = server.hits.get(name, 0) + 1
                actions = server.script.get(name, [])
                action = actions[server.hits[name] - 1] if server.hits[name] <= len(actions) else "ok"
                if action in ("500", "404") or not name.startswith("shard_"):
                    self.send_error(int(action) if action in ("500", "404") else 404)
                    return
                body = shard_bytes(int(name[6:11]), server.num_docs)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action == "stall":  # half the file, then nothing until the test ends
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    server.stop.wait(60)
                    return
                if action == "disconnect":
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ShardServer()
    yield s
    s.close()


def test_download_retries_disconnects_and_500s_and_writes_only_complete_files(tmp_path, server):
    server.script = {shard_name(0): ["disconnect", "ok"], shard_name(1): ["500", "disconnect", "ok"]}
    failures = download_shards([0, 1, VAL_SHARD], str(tmp_path), server.url, num_workers=3, retry_delay=0.01)
    assert failures == {}
    assert server.hits == {shard_name(0): 2, shard_name(1): 3, shard_name(VAL_SHARD): 1}
    assert sorted(os.listdir(tmp_path)) == [shard_name(0), shard_name(1), shard_name(VAL_SHARD)]  # no temp files left
    for index in (0, 1, VAL_SHARD):
        assert (tmp_path / shard_name(index)).read_bytes() == shard_bytes(index)


def test_download_404_fails_fast_with_a_clear_message(tmp_path, server):
    server.script = {shard_name(7): ["404"]}
    failures = download_shards([7], str(tmp_path), server.url, retry_delay=0.01)
    assert server.hits[shard_name(7)] == 1  # a missing file is not retried
    assert "HTTP 404" in failures[7] and "MAX_SHARD" in failures[7]
    assert os.listdir(tmp_path) == []


def test_download_gives_up_after_max_attempts_and_leaves_nothing(tmp_path, server):
    server.script = {shard_name(2): ["500"] * 10}
    failures = download_shards([2], str(tmp_path), server.url, max_attempts=3, retry_delay=0.01)
    assert server.hits[shard_name(2)] == 3
    assert "giving up after 3 attempts" in failures[2] and "HTTP 500" in failures[2]
    assert os.listdir(tmp_path) == []


def test_download_skips_valid_shards_and_refetches_corrupt_ones(tmp_path, server):
    (tmp_path / shard_name(0)).write_bytes(shard_bytes(0))
    (tmp_path / shard_name(1)).write_bytes(shard_bytes(1)[:100])  # truncated by an old, killed download
    assert download_shards([0, 1], str(tmp_path), server.url, retry_delay=0.01) == {}
    assert shard_name(0) not in server.hits and server.hits[shard_name(1)] == 1
    assert (tmp_path / shard_name(1)).read_bytes() == shard_bytes(1)


def run_cli(args, base_dir, url, max_shard=5):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_DATA_URL=url, NANOCHAT_MAX_SHARD=str(max_shard))
    return subprocess.run([sys.executable, "-m", "nanochat.dataset", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_downloads_train_shards_plus_pinned_val_shard(tmp_path, server):
    server.script = {shard_name(1): ["disconnect"]}
    result = run_cli(["-n", "2", "-w", "2", "--retry-delay", "0.01"], tmp_path, server.url)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "base_data")) == [shard_name(0), shard_name(1), shard_name(5)]
    # a second run finds everything valid and downloads nothing
    hits_before = dict(server.hits)
    assert run_cli(["-n", "2"], tmp_path, server.url).returncode == 0
    assert server.hits == hits_before


@pytest.mark.slow
def test_cli_reports_an_unreachable_host_clearly(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli(["-n", "1", "--max-attempts", "2", "--retry-delay", "0.01"], tmp_path, f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert "unreachable" in result.stderr and "NANOCHAT_DATA_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path / "base_data") == []


@pytest.mark.slow
def test_killed_download_leaves_no_file_that_looks_finished(tmp_path, server):
    server.script = {shard_name(0): ["stall"]}
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), NANOCHAT_DATA_URL=server.url, NANOCHAT_MAX_SHARD="5")
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.dataset", "-n", "1", "-w", "1"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data_dir = tmp_path / "base_data"
    deadline = time.time() + 60
    while not (data_dir.exists() and any(".tmp" in f for f in os.listdir(data_dir))):  # mid-transfer
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert shard_name(0) not in os.listdir(data_dir)
    assert list_parquet_files(str(data_dir))[0].startswith(SAMPLE_DIR)  # the partial file is never used
    # the next run cleans up and finishes the job
    result = run_cli(["-n", "1", "--retry-delay", "0.01"], tmp_path, server.url)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(data_dir)) == [shard_name(0), shard_name(5)]
