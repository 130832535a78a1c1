"""
Pretraining data: FineWeb-Edu as numbered parquet shards (one `text` column, row groups of ~1024
documents), downloaded into <base dir>/base_data, plus a small embedded sample corpus that ships with
the repository so everything also runs offline.

Download (train shards 0..N-1 plus the pinned validation shard):
    python -m nanochat.dataset -n 8 -w 4

Which data is used:
  - shards in <base dir>/base_data if any were downloaded;
  - otherwise, or when NANOCHAT_DATA=sample, the embedded sample in nanochat/sample_data/.
The validation split is always one fixed file: the dataset's last shard (or the sample's val.parquet),
never "whichever shard happened to be downloaded last".

Why FineWeb-Edu (Penedo et al. 2024): web text filtered by a classifier for educational value, which
reaches a given benchmark score with far fewer tokens than unfiltered web text, and a small model
has few tokens to spend. Karpathy's copy is re-sharded and shuffled, so reading the shards in order
is already a random stream of documents and the loader needs no shuffle buffer.

Why parquet row groups: a row group (~1024 documents) is the unit parquet reads and decompresses on
its own, so it is the natural unit to hand out to ranks (rank r reads row groups r, r+W, r+2W, ... of
every file) and to record for an exact resume ("the last row group read was (file, group)").
"""
import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.artifacts import atomic_write
from nanochat.common import get_base_dir

# Where the shards live; a mirror can be used by setting NANOCHAT_DATA_URL (the tests point it at 127.0.0.1).
BASE_URL = os.environ.get("NANOCHAT_DATA_URL", "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main")
# The dataset's shards are shard_00000 ... shard_{MAX_SHARD}; the tests serve a tiny one and lower it.
MAX_SHARD = int(os.environ.get("NANOCHAT_MAX_SHARD", "1822"))
# Pinned to the last shard: train shards are fetched from 0 upwards, so however many a run downloads (-n),
# its validation text is never one of its training shards, and runs of any size are scored on the same text.
VAL_SHARD = MAX_SHARD
DATA_DIR = os.path.join(get_base_dir(), "base_data")
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data")


def shard_name(index):
    # zero-padded so that sorting the names sorts the shards: list_parquet_files relies on it
    return f"shard_{index:05d}.parquet"


def use_sample():
    """NANOCHAT_DATA=sample: use the embedded corpus even where shards were downloaded (offline, reproducible runs)."""
    return os.environ.get("NANOCHAT_DATA", "").lower() == "sample"


def list_parquet_files(data_dir=None):
    """Sorted paths of the shards in data_dir; the embedded sample when there are none (or NANOCHAT_DATA=sample)."""
    data_dir = data_dir or DATA_DIR
    # Sorted: every rank must see the same file list in the same order, or their strides over it would overlap.
    # Files other than shard_*.parquet (the .tmp of a download in progress) are never data.
    if not use_sample() and os.path.isdir(data_dir):
        files = sorted(f for f in os.listdir(data_dir) if f.startswith("shard_") and f.endswith(".parquet"))
        if files:
            return [os.path.join(data_dir, f) for f in files]
    # the fallback that lets every stage, and the test suite, run on a machine that has never downloaded anything
    return [os.path.join(SAMPLE_DIR, "train.parquet"), os.path.join(SAMPLE_DIR, "val.parquet")]


def split_files(split, data_dir=None):
    """The files of one split: val is the single pinned file, train is every other file."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val' (got {split!r})")
    files = list_parquet_files(data_dir)
    names = [os.path.basename(f) for f in files]
    # chosen by name, not by position: with shards 0..7 downloaded the last file is shard 7, a train shard
    val_name = "val.parquet" if "val.parquet" in names else shard_name(VAL_SHARD)
    if split == "val":
        if val_name not in names:
            raise FileNotFoundError(
                f"the validation shard {val_name} is missing from {os.path.dirname(files[0])}; "
                f"fetch it with `python -m nanochat.dataset -n 0` (it is always downloaded alongside the train shards)")
        return [files[names.index(val_name)]]
    train = [f for f, name in zip(files, names) if name != val_name]
    if not train:
        raise FileNotFoundError(
            f"no train shards in {os.path.dirname(files[0])} (only the validation shard); "
            f"download some with `python -m nanochat.dataset -n 8`, or set NANOCHAT_DATA=sample to use the embedded sample")
    return train


def open_parquet(path):
    """Open a shard, turning the unhelpful arrow errors for damaged files into one that names the file."""
    # files are opened as the stream reaches them, so a damaged one may surface hours into a run: the error names
    # the file and the fix
    try:
        parquet_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise RuntimeError(
            f"{path} is corrupt or truncated ({e}). Delete it and rerun `python -m nanochat.dataset -n N`, "
            f"which re-validates every shard and fetches damaged ones again") from None
    if "text" not in parquet_file.schema_arrow.names:
        raise RuntimeError(f"{path} has no `text` column (columns: {parquet_file.schema_arrow.names}); it is not a pretraining shard")
    return parquet_file


def read_row_group(parquet_file, path, row_group):
    """The documents (str) of one row group. Only the `text` column is read: parquet stores columns apart."""
    try:
        return parquet_file.read_row_group(row_group, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise RuntimeError(
            f"{path} is corrupt or truncated (row group {row_group}: {e}). Delete it and rerun "
            f"`python -m nanochat.dataset -n N` to fetch it again") from None


def iter_row_groups(split, start=0, step=1, data_dir=None, after=None):
    """
    Yields (file_index, row_group_index, texts) for row groups start, start+step, ... of every file of
    the split, so ranks with start=rank, step=world_size read disjoint data. after=(file_index,
    row_group_index) resumes just past that row group (what the dataloader records in its state).

    The stride starts again in every file. With 2 ranks and files of 3 row groups, rank 0 reads groups 0 and 2
    of each file and rank 1 only group 1. Unequal shares are tolerated (each rank loops over its own share in
    epochs, so none runs dry before the others); a rank with no row group at all is an error, not a hang.
    """
    files = split_files(split, data_dir)
    # the same file list and stride on every rank: the ranks' row groups never overlap and nothing is skipped
    first_file, last_row_group = after if after is not None else (0, None)
    for file_index in range(first_file, len(files)):
        path = files[file_index]
        # opened lazily, one file at a time: only the footer is read here, the row groups when they are reached
        parquet_file = open_parquet(path)
        first_row_group = start
        if file_index == first_file and last_row_group is not None:
            # the row group recorded was this rank's (start + k*step), so the next one of its stride is one step on
            first_row_group = last_row_group + step
        for row_group in range(first_row_group, parquet_file.num_row_groups, step):
            yield file_index, row_group, read_row_group(parquet_file, path, row_group)


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yields lists of document strings, one list per row group, for this rank's stride of the split."""
    for _, _, texts in iter_row_groups(split, start, step, data_dir):
        yield texts


# -----------------------------------------------------------------------------
# Downloading

def is_valid_shard(path):
    """
    A complete parquet file has its footer; a truncated download does not. Reading the footer is cheap.
    (Parquet writes its metadata, the schema and where each row group starts, at the END of the file, after
    the magic bytes "PAR1": a file cut short anywhere has no readable footer.)
    """
    try:
        parquet_file = pq.ParquetFile(path)
        # an HTML error page saved under the shard's name fails here too: it has no parquet footer at all
        return "text" in parquet_file.schema_arrow.names and parquet_file.metadata.num_rows > 0
    except (pa.ArrowException, OSError):
        return False


class PermanentDownloadError(Exception):
    """A failure that retrying will not fix (e.g. 404)."""


def fetch_once(url, f, timeout):
    """Stream url into the open file f; raise on any incomplete or failed transfer."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        # a server that drops the connection mid-body ends the stream without an error: only comparing the byte
        # count with Content-Length tells a truncated transfer from a finished one
        expected = response.headers.get("Content-Length")
        received = 0
        while True:
            # 1 MiB at a time: a shard never sits in memory whole, and threads overlap their network waits
            chunk = response.read(1 << 20)
            if not chunk:
                break
            f.write(chunk)
            received += len(chunk)
    if expected is not None and received != int(expected):
        raise ConnectionError(f"connection closed after {received} of {expected} bytes")


def download_shard(index, data_dir, base_url, max_attempts=5, retry_delay=2.0, timeout=30.0):
    """
    Download one shard with retries and exponential backoff. The bytes go to a temporary file that is
    renamed into place only once it is complete and readable, so a killed download never leaves a
    truncated file that looks finished. Returns "skipped" or "downloaded"; raises with a clear message.
    """
    name = shard_name(index)
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
        if is_valid_shard(path):
            return "skipped"
        tqdm.write(f"{name} exists but is corrupt or truncated: fetching it again")
    url = f"{base_url}/{name}"
    last_error = None
    for attempt in range(1, max_attempts + 1):
        try:
            # any failure below removes the partial file; path appears only when valid
            with atomic_write(path) as f:
                fetch_once(url, f, timeout)
                # flushed so the check reads the file as it will land, footer included
                f.flush()
                if not is_valid_shard(f.name):
                    raise ValueError("the downloaded file is not a readable parquet shard")
            return "downloaded"
        except urllib.error.HTTPError as e:
            last_error = f"HTTP {e.code} {e.reason}"
            # a 4xx means the request itself is wrong (no such shard): asking again won't help. 429 (Too Many
            # Requests) is the exception: the host asks us to slow down, which the backoff below does.
            if 400 <= e.code < 500 and e.code != 429:
                raise PermanentDownloadError(f"{url}: {last_error}. Check NANOCHAT_DATA_URL / the shard index "
                                             f"(shards go from 0 to MAX_SHARD={MAX_SHARD})") from None
        except urllib.error.URLError as e:
            last_error = f"cannot reach the host ({e.reason})"
        except (OSError, ValueError, ConnectionError) as e:  # timeouts, resets, truncated bodies
            last_error = f"{type(e).__name__}: {e}"
        if attempt < max_attempts:
            # exponential backoff (2, 4, 8, 16 s by default): a host that is overloaded or rate-limiting gets
            # room to recover instead of being hammered by every worker at once
            delay = retry_delay * 2 ** (attempt - 1)
            tqdm.write(f"{name}: attempt {attempt}/{max_attempts} failed ({last_error}); retrying in {delay:.1f}s")
            time.sleep(delay)
    raise RuntimeError(f"{url}: giving up after {max_attempts} attempts; last error: {last_error}")


def download_shards(indices, data_dir=None, base_url=None, num_workers=4, max_attempts=5, retry_delay=2.0):
    """Download shards in parallel threads (the work is network-bound). Returns {index: error message} of failures."""
    data_dir = data_dir or DATA_DIR
    base_url = (base_url or BASE_URL).rstrip("/")
    os.makedirs(data_dir, exist_ok=True)
    # atomic_write's temporaries: partial downloads of a run that was killed (SIGKILL or a power cut skips the
    # cleanup). They are never read as data, only in the way.
    stale = [f for f in os.listdir(data_dir) if f.startswith("shard_") and f.endswith(".tmp")]
    if stale:
        print(f"removing {len(stale)} partial download(s) left by an interrupted run")
        for f in stale:
            os.remove(os.path.join(data_dir, f))
    failures, counts = {}, {"downloaded": 0, "skipped": 0}
    # One shard's failure is collected, not raised: the others still finish, and a rerun fetches only what is
    # missing (finished shards are skipped after a cheap footer check).
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        futures = {pool.submit(download_shard, i, data_dir, base_url, max_attempts, retry_delay): i for i in indices}
        with tqdm(total=len(futures), desc="shards", unit="shard") as progress:
            for future in as_completed(futures):
                try:
                    counts[future.result()] += 1
                except (PermanentDownloadError, RuntimeError) as e:
                    failures[futures[future]] = str(e)
                progress.update(1)
                progress.set_postfix(counts)
    return failures


def main():
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu pretraining shards into <base dir>/base_data")
    parser.add_argument("-n", "--num-files", type=int, default=-1,
                        help=f"number of train shards to download (-1: all {MAX_SHARD}); the validation shard is always fetched too")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--max-attempts", type=int, default=5, help="tries per shard before giving up")
    parser.add_argument("--retry-delay", type=float, default=2.0, help="seconds before the first retry; doubles after each failure")
    parser.add_argument("--data-dir", default=None, help=f"where to put the shards (default {DATA_DIR})")
    args = parser.parse_args()
    if args.num_workers < 1 or args.max_attempts < 1:
        parser.error("--num-workers and --max-attempts must be at least 1")

    # train shards are 0..num_train-1 and never include VAL_SHARD (= MAX_SHARD): at most MAX_SHARD of them
    num_train = MAX_SHARD if args.num_files < 0 else min(args.num_files, MAX_SHARD)
    indices = list(range(num_train)) + [VAL_SHARD]
    data_dir = args.data_dir or DATA_DIR
    print(f"Downloading {num_train} train shards + validation shard {shard_name(VAL_SHARD)} "
          f"from {BASE_URL} into {data_dir} with {args.num_workers} workers")
    failures = download_shards(indices, data_dir, BASE_URL, args.num_workers, args.max_attempts, args.retry_delay)
    if failures:
        print(f"\n{len(failures)} of {len(indices)} shards failed:", file=sys.stderr)
        for index in sorted(failures):
            print(f"  {shard_name(index)}: {failures[index]}", file=sys.stderr)
        if all("cannot reach the host" in message for message in failures.values()):
            print(f"\nThe data host is unreachable. Check the network, or point NANOCHAT_DATA_URL at a mirror. "
                  f"Without shards, nanochat trains on its embedded sample corpus ({SAMPLE_DIR}).", file=sys.stderr)
        print("Rerun the same command to fetch the missing shards; finished ones are kept.", file=sys.stderr)
        sys.exit(1)
    print(f"Done: {len(indices)} shards present in {data_dir}")


if __name__ == "__main__":
    main()
