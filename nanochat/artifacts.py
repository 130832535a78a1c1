"""
Files on disk (checkpoints, the tokenizer, downloads, report sections) are written all or nothing, and
damaged ones are reported in one sentence, never a traceback.

Writing: atomic_write puts the bytes in a temporary file in the same directory, flushes and fsyncs it,
renames it over the target (atomic on POSIX within one filesystem) and fsyncs the directory so the
rename itself survives a power cut. A crash at any point leaves the old file or none, never half of one.

When a file is written, its size and sha256 are recorded (the "record": {"bytes": N, "sha256": "..."}).
When it is read back, the record is checked first: a missing file, an empty one, a wrong size (truncated)
or a wrong checksum (corrupted bytes) each raise DamagedArtifactError naming the file and what is wrong;
the caller, who knows which stage wrote the file, adds what to do about it. A file written before records
existed has none: it is still read, and a failure to parse it is reported the same way.

Cost, and why we hash on every load anyway: sha256 is streamed in 8 MB blocks (memory stays flat). At save
it reads the file just written back from the page cache; at load it reads the file once before torch.load
reads it again (from the page cache). On a 537 MB checkpoint (`python -m dev.bench_checksum`, 2-core EPYC
with SHA-NI, ~1.2 GB/s) that adds ~0.45 s to a ~0.4 s save and ~0.45 s to a ~0.45 s load: twice the time
of a warm load, seconds for a multi-GB model, which is small next to building, compiling or training it,
while sizes alone would miss a flipped bit that then trains or chats on silently.
"""
import contextlib
import hashlib
import json
import os
import secrets
import sys
from pickle import UnpicklingError

HASH_BLOCK_BYTES = 8 * 2**20  # big enough to run at hashlib's full speed, small enough to keep memory flat


@contextlib.contextmanager
def atomic_write(path, mode="wb", encoding=None):
    """
    with atomic_write(path) as f: f.write(...): path appears complete when the block ends, or not at all
    (an exception removes the temporary file; a crash leaves only a `<name>.<random>.tmp` beside it).
    f.name is the temporary file's path, for checks that read back what was written before it lands.
    """
    # The temporary file goes in the target's own directory, not /tmp: a rename is atomic only within one
    # filesystem (across two, os.replace fails with EXDEV, and a copy could be seen half done).
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # a fresh name per call (two ranks or threads may write the same path); "x" creates it, with the umask's
    # permissions (tempfile.mkstemp would make every artifact private to its owner)
    tmp_path = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        # "x": create, and fail should the name exist, so no one else's file is ever truncated or written into
        with open(tmp_path, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        # one system call: a reader opening `path` gets the old file or the new one, never a mixture
        os.replace(tmp_path, path)
    # BaseException: a KeyboardInterrupt or SystemExit mid-write must clean up too
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    try:
        directory_handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_handle)  # the rename is on disk too
        finally:
            os.close(directory_handle)
    except OSError:
        pass  # some filesystems and platforms cannot fsync a directory; the rename is still atomic


def write_recorded(path, write, record_beside=False):
    """
    write(f) into path all or nothing; -> its record (size, sha256), hashed from the temporary file so it
    describes exactly the bytes that land. record_beside also saves the record next to it (<path>.json), for
    a file that has no meta of its own to hold it (an optimizer shard, the tokenizer files).
    """
    with atomic_write(path) as f:
        write(f)
        # flushed first, or the hash would miss what is still in Python's buffer
        f.flush()
        record = file_record(f.name)
    if record_beside:
        with atomic_write(sidecar_path(path), "w", encoding="utf-8") as f:
            json.dump(record, f)
    return record


class DamagedArtifactError(ValueError):
    """A file that is missing, truncated, corrupt or unparseable; the message is complete (file, problem, remedy).
    A ValueError, so the scripts' existing `except (FileNotFoundError, ValueError)` handlers report it as it is."""


def file_record(path):
    """{"bytes": size, "sha256": hex digest} of the file at path, hashed in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def check_file(path, record=None):
    """Raise DamagedArtifactError if the file is missing, empty, or differs from its record (None: no record to check)."""
    if not os.path.exists(path):
        raise DamagedArtifactError(f"{path} is missing")
    size = os.path.getsize(path)
    # an empty file is never a valid artifact; it is what a full disk or a killed copy often leaves
    if size == 0:
        raise DamagedArtifactError(f"{path} is empty")
    if record is None:
        return
    # the size first: free to check, and it catches truncation before seconds of hashing
    if size != record["bytes"]:
        raise DamagedArtifactError(f"{path} is {size:,} bytes but was saved with {record['bytes']:,} (truncated or overwritten)")
    if file_record(path)["sha256"] != record["sha256"]:
        raise DamagedArtifactError(f"{path} has the right size but the wrong sha256 checksum (its bytes are corrupted)")


def looks_whole(path, record=None):
    """The cheap half of check_file (no hashing): the file exists, is not empty, and has its recorded size."""
    return os.path.exists(path) and os.path.getsize(path) > 0 and (record is None or os.path.getsize(path) == record["bytes"])


def sidecar_path(path):
    """Where the record of a file that has no meta to hold it is kept: right next to it, as <file>.json."""
    return f"{path}.json"


def read_sidecar(path):
    """The record saved next to path, or None for a file written before records existed."""
    record_path = sidecar_path(path)
    if not os.path.exists(record_path):
        return None
    return read_json(record_path, required_keys=("bytes", "sha256"))


def read_json(path, required_keys=()):
    """A JSON object from path; DamagedArtifactError if it is missing, empty, not valid JSON or lacks a required key."""
    # no record: the JSON files (metas, sidecars) are where records live, and they are checked by parsing
    check_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedArtifactError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DamagedArtifactError(f"{path} holds a JSON {type(data).__name__}, not an object")
    missing = [key for key in required_keys if key not in data]
    if missing:
        raise DamagedArtifactError(f"{path} lacks the key(s) {missing}")
    return data


def load_checked(path, record, load):
    """check_file, then load(path); any failure of load to parse the bytes becomes DamagedArtifactError too."""
    check_file(path, record)
    try:
        return load(path)
    except DamagedArtifactError:  # a message already complete
        raise
    except Exception as e:
        if out_of_memory(e):  # no fault of the file
            raise
        raise damaged(path, e) from None


def out_of_memory(error):
    """A MemoryError or torch's OutOfMemoryError. torch is looked up, not imported: speedrun.sh writes stage
    markers through this module, and importing torch for that took ~2 s a stage."""
    torch = sys.modules.get("torch")
    return isinstance(error, MemoryError) or (torch is not None and isinstance(error, torch.OutOfMemoryError))


def damaged(path, error):
    """The DamagedArtifactError for a file whose bytes its parser refused with `error`."""
    if isinstance(error, UnpicklingError):
        # torch.load(weights_only=True) met an object that is not a tensor or plain data: loading it would mean
        # running code named by the file, so it is refused, whatever its record says (a record is no signature)
        return DamagedArtifactError(f"{path} cannot be read: it is not a file of tensors and plain data (other objects "
                                    f"are never loaded: unpickling them could run code)")
    if isinstance(error, ValueError):  # our own format checks (tokenizer, JSON): their first line names what is wrong
        return DamagedArtifactError(f"{path} is not valid: {str(error).splitlines()[0][:300] if str(error) else type(error).__name__}")
    # a truncated zip, an unexpected EOF: whatever the parser says, the file is bad. Only the error's type:
    # parsers' own messages run to paragraphs (torch's even suggests weights_only=False)
    return DamagedArtifactError(f"{path} cannot be read: its bytes do not parse ({type(error).__name__})")
