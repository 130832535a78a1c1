"""
Damaged artifacts: a missing, empty, truncated or corrupted checkpoint, meta, optimizer shard or tokenizer
file is reported in one message naming the file, what is wrong and what to do (with the steps that are
still whole), never a traceback. Most cases call the library on real files; one or two per entry point
run the real script as a subprocess. Checkpoints and tokenizers saved before records existed still load.
"""
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, random_gpt
from nanochat.artifacts import DamagedArtifactError, file_record, sidecar_path
from nanochat.checkpoint_manager import list_whole_steps, load_checkpoint, load_model, save_checkpoint
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from test_base_train import TRAIN_FLAGS

# what each kind of damage is called in the message
PROBLEMS = {"missing": "is missing", "empty": "is empty", "truncated": "bytes but was saved with",
            "corrupted": "wrong sha256", "invalid_json": "not valid JSON"}


def damage(path, kind):
    """Damage a real file the way disks, copies and crashes do."""
    path = pathlib.Path(path)
    data = path.read_bytes()
    if kind == "missing":
        path.unlink()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupted":  # same size, a few bytes in the middle flipped
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8]) + data[middle + 8:])
    elif kind == "invalid_json":
        path.write_text('{"step": 2, "model_config": ')
    else:
        raise ValueError(kind)


def save_base_checkpoint(checkpoint_dir, model, step):
    meta = {"model_config": dataclasses.asdict(model.config), "step": step}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), {"optimizers": [], "step": step}, meta)


@pytest.fixture(scope="module")
def good_base_dir(tiny_tokenizer, tmp_path_factory):
    """A base dir with the tiny tokenizer and base checkpoints d2 at steps 1 and 2 (model, meta, shard of rank 0)."""
    base_dir = tmp_path_factory.mktemp("good")
    tiny_tokenizer.save(os.path.join(base_dir, "tokenizer"))
    model = random_gpt(tiny_tokenizer, sequence_len=64, n_head=2, n_kv_head=2)
    for step in (1, 2):
        save_base_checkpoint(os.path.join(base_dir, "base_checkpoints", "d2"), model, step)
    return base_dir


@pytest.fixture
def base_dir(good_base_dir, tmp_path, monkeypatch):
    """A fresh copy of the good base dir, ours to damage, as NANOCHAT_BASE_DIR."""
    copy = tmp_path / "base"
    shutil.copytree(good_base_dir, copy)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(copy))
    return copy


def checkpoint_file(base_dir, name):
    return str(base_dir / "base_checkpoints" / "d2" / name)


def test_a_good_checkpoint_records_its_files_and_loads(base_dir):
    checkpoint_dir = str(base_dir / "base_checkpoints" / "d2")
    on_disk = json.loads(pathlib.Path(checkpoint_file(base_dir, "meta_000002.json")).read_text())
    assert on_disk["files"] == {"model_000002.pt": file_record(checkpoint_file(base_dir, "model_000002.pt"))}
    shard = checkpoint_file(base_dir, "optim_000002_rank0.pt")
    assert json.loads(pathlib.Path(sidecar_path(shard)).read_text()) == file_record(shard)
    model_data, optimizer_data, meta = load_checkpoint(checkpoint_dir, 2, "cpu", load_optimizer=True)
    assert meta["step"] == 2 and "files" not in meta, "the records are the checkpoint's bookkeeping, not the stage's meta"
    assert optimizer_data == {"optimizers": [], "step": 2}
    model, tokenizer, meta = load_model("base", "cpu", "eval")
    assert meta["step"] == 2 and tokenizer.get_vocab_size() == 512
    assert list_whole_steps(checkpoint_dir) == [1, 2]


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "corrupted"])
def test_damaged_model_file_is_named_with_the_whole_steps(base_dir, kind):
    path = checkpoint_file(base_dir, "model_000002.pt")
    damage(path, kind)
    with pytest.raises(DamagedArtifactError) as error:
        load_model("base", "cpu", "eval")  # the latest step, 2
    message = str(error.value)
    assert path in message and PROBLEMS[kind] in message
    assert "rerun the stage" in message and "--step" in message and "whole: [1]" in message


@pytest.mark.parametrize("kind", ["empty", "truncated", "corrupted", "invalid_json", "lacks_key"])
def test_damaged_meta_is_named_with_the_whole_steps(base_dir, kind):
    path = checkpoint_file(base_dir, "meta_000002.json")
    if kind == "lacks_key":
        meta = json.loads(pathlib.Path(path).read_text())
        del meta["model_config"]
        pathlib.Path(path).write_text(json.dumps(meta))
    else:
        damage(path, kind)
    with pytest.raises(DamagedArtifactError) as error:
        load_model("base", "cpu", "eval", step=2)
    message = str(error.value)
    expected = {"empty": "is empty", "lacks_key": "lacks the key(s) ['model_config']"}.get(kind, "not valid JSON")
    assert path in message and expected in message and "whole: [1]" in message


def test_missing_meta_means_the_step_was_never_completed(base_dir):
    os.remove(checkpoint_file(base_dir, "meta_000002.json"))  # the meta is written last: without it the save never finished
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint for step 2 .*available steps: \[1\]"):
        load_model("base", "cpu", "eval", step=2)
    assert load_model("base", "cpu", "eval")[2]["step"] == 1


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "corrupted", "invalid_json"])
def test_damaged_optimizer_shard_or_its_record_is_named(base_dir, kind):
    checkpoint_dir = str(base_dir / "base_checkpoints" / "d2")
    shard = checkpoint_file(base_dir, "optim_000002_rank0.pt")
    path = sidecar_path(shard) if kind == "invalid_json" else shard
    damage(path, kind)
    expected_error = FileNotFoundError if kind == "missing" else DamagedArtifactError
    with pytest.raises(expected_error) as error:
        load_checkpoint(checkpoint_dir, 2, "cpu", load_optimizer=True)
    message = str(error.value)
    assert path in message and PROBLEMS[kind] in message and "[1]" in message
    if kind != "invalid_json":  # a damaged shard does not stop the weights from loading for inference
        assert load_checkpoint(checkpoint_dir, 2, "cpu")[2]["step"] == 2


def test_each_rank_records_and_checks_its_own_shard(base_dir):
    """Rank 1 saves its shard and record alongside rank 0's step (as under torchrun); its damage is found by rank 1's load."""
    checkpoint_dir = str(base_dir / "base_checkpoints" / "d2")
    save_checkpoint(checkpoint_dir, 2, None, {"optimizers": [], "rank": 1}, None, rank=1)
    assert load_checkpoint(checkpoint_dir, 2, "cpu", load_optimizer=True, rank=1)[1] == {"optimizers": [], "rank": 1}
    shard = checkpoint_file(base_dir, "optim_000002_rank1.pt")
    damage(shard, "truncated")
    with pytest.raises(DamagedArtifactError, match=f"{shard} is .* bytes but was saved with .*whole: \\[1\\]"):
        load_checkpoint(checkpoint_dir, 2, "cpu", load_optimizer=True, rank=1)
    assert list_whole_steps(checkpoint_dir) == [1], "one damaged shard makes the whole step unfit to resume"


def test_no_whole_step_left_says_to_rerun_the_stage(base_dir):
    for step in (1, 2):
        damage(checkpoint_file(base_dir, f"model_{step:06d}.pt"), "truncated")
    with pytest.raises(DamagedArtifactError, match="no other step .* is whole: rerun the stage"):
        load_model("base", "cpu", "eval")


@pytest.mark.parametrize("name", ["tokenizer.tiktoken", "tokenizer_config.json", "token_bytes.pt"])
@pytest.mark.parametrize("kind", ["empty", "truncated", "corrupted"])
def test_damaged_tokenizer_file_says_to_rerun_tok_train(base_dir, name, kind):
    path = str(base_dir / "tokenizer" / name)
    damage(path, kind)
    with pytest.raises(DamagedArtifactError) as error:
        get_tokenizer() if name.startswith("tokenizer") else get_token_bytes()
    message = str(error.value)
    assert path in message and PROBLEMS[kind] in message and "python -m scripts.tok_train" in message


def test_missing_tokenizer_file_says_to_train_one(base_dir):
    for name, load in (("tokenizer_config.json", get_tokenizer), ("token_bytes.pt", get_token_bytes)):
        path = str(base_dir / "tokenizer" / name)
        os.remove(path)
        with pytest.raises(FileNotFoundError) as error:
            load()
        assert path in str(error.value) and "python -m scripts.tok_train" in str(error.value)


def test_files_saved_before_records_existed_still_load_and_still_fail_clearly(base_dir):
    """No "files" in the meta, no <file>.json sidecars: loaded unchecked; unparseable bytes are still named."""
    checkpoint_dir = str(base_dir / "base_checkpoints" / "d2")
    for step in (1, 2):
        meta_path = checkpoint_file(base_dir, f"meta_{step:06d}.json")
        meta = json.loads(pathlib.Path(meta_path).read_text())
        del meta["files"]
        pathlib.Path(meta_path).write_text(json.dumps(meta))
        os.remove(sidecar_path(checkpoint_file(base_dir, f"optim_{step:06d}_rank0.pt")))
    for name in ("tokenizer.tiktoken", "tokenizer_config.json", "token_bytes.pt"):
        os.remove(sidecar_path(str(base_dir / "tokenizer" / name)))
    model, tokenizer, meta = load_model("base", "cpu", "eval")
    assert meta["step"] == 2 and tokenizer.get_vocab_size() == 512 and get_token_bytes().shape == (512,)
    assert load_checkpoint(checkpoint_dir, 2, "cpu", load_optimizer=True)[1] == {"optimizers": [], "step": 2}
    assert list_whole_steps(checkpoint_dir) == [1, 2]
    # without a record a truncated file is caught when it fails to parse
    path = checkpoint_file(base_dir, "model_000002.pt")
    damage(path, "truncated")
    with pytest.raises(DamagedArtifactError, match=f"{path} cannot be read: its bytes do not parse.*whole: \\[1\\]"):
        load_model("base", "cpu", "eval")
    damage(str(base_dir / "tokenizer" / "tokenizer.tiktoken"), "truncated")
    with pytest.raises(DamagedArtifactError, match="tokenizer.tiktoken (is not valid: line|holds).*scripts.tok_train"):
        get_tokenizer()


# -----------------------------------------------------------------------------
# the real entry points: one message on stderr, a non-zero exit, no traceback


# each entry point against its own damaged copy: (script, flags, damaged file, damage, what the remedy must mention);
# base_train resumes from step 2 (tag d2): every file is checked before anything is compared with this run's model,
# so the tiny checkpoint need not match it (test_base_train resumes a real run's shards bit-exactly)
ENTRY_POINTS = [
    ("scripts.chat_cli", ["-i", "base", "-p", "hi"], "model_000002.pt", "corrupted", "whole: [1]"),
    ("scripts.chat_eval", ["-i", "base"], "meta_000002.json", "invalid_json", "whole: [1]"),
    ("scripts.chat_web", ["-i", "base", "--port", "1"], "model_000002.pt", "empty", "whole: [1]"),
    ("scripts.base_loss", [], "tokenizer_config.json", "empty", "scripts.tok_train"),
    ("scripts.base_eval", [], "model_000002.pt", "truncated", "whole: [1]"),
    ("scripts.mid_train", [], "model_000002.pt", "missing", "whole: [1]"),
    ("scripts.chat_sft", ["--source", "base"], "tokenizer.tiktoken", "corrupted", "scripts.tok_train"),
    ("scripts.base_train", TRAIN_FLAGS + ["--num-iterations", "2", "--resume-from-step", "2"], "optim_000002_rank0.pt",
     "corrupted", "whole: [1]"),
]


def damaged_file(base_dir, name):
    return str(base_dir / "tokenizer" / name) if name.startswith("tok") else checkpoint_file(base_dir, name)


@pytest.fixture(scope="module")
def entry_point_runs(good_base_dir, tmp_path_factory):
    """
    Every entry point run as a real subprocess, all at once: they are independent, and each spends seconds
    importing torch, so on 2 cores running them together halves the wait. -> {script: (exit code, stderr, damaged path)}.
    """
    processes = {}
    for module, args, name, kind, _ in ENTRY_POINTS:
        base_dir = tmp_path_factory.mktemp(module.split(".")[1])
        shutil.copytree(good_base_dir, base_dir, dirs_exist_ok=True)
        (base_dir / "eval_bundle").mkdir()
        (base_dir / "eval_bundle" / "core.yaml").touch()  # base_eval looks for its bundle before the model: no download
        path = damaged_file(base_dir, name)
        damage(path, kind)
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_DATA="sample", OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
        process = subprocess.Popen([sys.executable, "-m", module, *args, "--device-type", "cpu"], cwd=REPO_ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        processes[module] = (process, path)
    runs = {}
    for module, (process, path) in processes.items():
        _, stderr = process.communicate(timeout=300)
        runs[module] = (process.returncode, stderr, path)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("module, args, name, kind, remedy", ENTRY_POINTS, ids=[case[0] for case in ENTRY_POINTS])
def test_entry_points_report_damage_in_one_message(entry_point_runs, module, args, name, kind, remedy):
    code, stderr, path = entry_point_runs[module]
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    for text in (path, PROBLEMS[kind], remedy):
        assert text in stderr, stderr
    if module == "scripts.base_train":
        assert "cannot resume" in stderr
        assert "--depth" not in stderr.splitlines()[-1], "the hint about model flags is for a mismatched model"


# ---------------------------------------------------------------------------- atomic_write

def test_atomic_write_is_all_or_nothing_even_when_the_process_dies(tmp_path):
    from nanochat.artifacts import atomic_write

    target = tmp_path / "artifact.bin"
    target.write_bytes(b"old and complete")
    # a crash mid-write (os._exit: no cleanup, no exception handling) leaves the old file untouched
    crash = (f"import os\nfrom nanochat.artifacts import atomic_write\n"
             f"with atomic_write({str(target)!r}) as f:\n    f.write(b'half of the new')\n    f.flush()\n    os._exit(1)\n")
    result = subprocess.run([sys.executable, "-c", crash], cwd=REPO_ROOT, capture_output=True, timeout=60)
    assert result.returncode == 1
    assert target.read_bytes() == b"old and complete"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "artifact.bin"]
    assert len(leftovers) == 1 and leftovers[0].startswith("artifact.bin.") and leftovers[0].endswith(".tmp")
    # an exception inside the block removes the temporary file and leaves the old one
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"partial")
            raise RuntimeError("disk full, say")
    assert target.read_bytes() == b"old and complete" and len(list(tmp_path.iterdir())) == 2
    # a completed block replaces it whole; text mode works too
    with atomic_write(tmp_path / "new" / "notes.md", "w", encoding="utf-8") as f:
        f.write("héllo")
    assert (tmp_path / "new" / "notes.md").read_text(encoding="utf-8") == "héllo"
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["notes.md"]


# -----------------------------------------------------------------------------
# a meta or model file that parses but describes nonsense: one message, before anything is allocated


@pytest.mark.parametrize("change, message", [
    ({"vocab_size": 10**12}, "vocab_size must be an integer from 1 to 2,097,152"),
    ({"n_head": 0}, "n_head must be an integer from 1 to 1,024"),
    ({"n_layer": 10**6}, "n_layer must be an integer from 1 to 256"),
    ({"n_layer": True}, "n_layer must be an integer"),
    ({"sequence_len": "2048"}, "sequence_len must be an integer"),
    ({"n_kv_head": 3}, "n_kv_head 3 must divide n_head 2"),
    ({"n_embd": 130}, "n_embd 130 must split into n_head 2 heads of an even width"),
    ({"x0_mixing": "yes"}, "x0_mixing must be true or false"),
    ({"flash": 1}, "unknown key 'flash'"),
])
def test_an_absurd_model_config_is_refused_before_the_model_is_built(base_dir, change, message):
    meta_path = checkpoint_file(base_dir, "meta_000002.json")
    meta = json.loads(pathlib.Path(meta_path).read_text())
    meta["model_config"].update(change)
    pathlib.Path(meta_path).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"meta_000002.json does not describe a model this code can build: .*{message}"):
        load_model("base", "cpu", "eval")


def test_a_state_dict_of_the_wrong_shapes_is_named_tensor_by_tensor(base_dir):
    import torch
    path = checkpoint_file(base_dir, "model_000002.pt")
    weights = torch.load(path, weights_only=True)
    weights["lm_head.weight"] = torch.zeros(3, 3)
    del weights["transformer.wte.weight"]
    weights["extra.weight"] = torch.zeros(1)
    torch.save(weights, path)
    meta_path = checkpoint_file(base_dir, "meta_000002.json")
    meta = json.loads(pathlib.Path(meta_path).read_text())
    meta["files"]["model_000002.pt"] = file_record(path)
    pathlib.Path(meta_path).write_text(json.dumps(meta))
    with pytest.raises(ValueError) as error:
        load_model("base", "cpu", "eval")
    message = str(error.value)
    assert "model_000002.pt does not match the model its meta describes" in message
    assert "missing transformer.wte.weight" in message and "unexpected extra.weight" in message
    assert "lm_head.weight is (3, 3), expected (512, 64)" in message
