"""
Nothing read from disk runs code. An attacker who can write into the base dir plants a payload in each kind of
file the pipeline reads (model, optimizer shard with the loader state and RNG, meta, tokenizer, token bytes,
report markers, the identity-conversation override, the CORE bundle's YAML) and rewrites the file's record to
match, as anyone who can write the file can. Each load must refuse the file with a message that names it, and
the payload must never run: it would create a marker directory, which must not exist afterwards.
"""
import dataclasses
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, random_gpt
from nanochat.artifacts import DamagedArtifactError, file_record, sidecar_path
from nanochat.checkpoint_manager import load_checkpoint, load_model, save_checkpoint
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from test_base_train import TRAIN_FLAGS


class Payload:
    """Pickled, this is the instruction "call os.mkdir(marker)": unpickling it is running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def planted(tiny_tokenizer, tmp_path, monkeypatch):
    """A base dir with a tokenizer and a base checkpoint (d2, step 1), and where a payload would leave its mark."""
    base_dir = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    model = random_gpt(tiny_tokenizer, sequence_len=64, n_head=2, n_kv_head=2)
    checkpoint_dir = str(base_dir / "base_checkpoints" / "d2")
    rng = {"cpu": torch.get_rng_state(), "cuda": None}
    save_checkpoint(checkpoint_dir, 1, model.state_dict(), {"optimizers": [], "train_loader": None, "rng": rng},
                    {"model_config": dataclasses.asdict(model.config), "step": 1})
    return base_dir, checkpoint_dir, str(tmp_path / "payload_ran")


def plant(path, obj, record_in_meta=None):
    """torch.save obj at path and rewrite its record (beside it, or in the given meta) so the checksum passes."""
    with open(path, "wb") as f:
        torch.save(obj, f)
    if record_in_meta is None:
        with open(sidecar_path(path), "w") as f:
            json.dump(file_record(path), f)
    else:
        with open(record_in_meta) as f:
            meta = json.load(f)
        meta["files"][os.path.basename(path)] = file_record(path)
        with open(record_in_meta, "w") as f:
            json.dump(meta, f)


def test_a_model_file_with_a_payload_is_refused(planted):
    base_dir, checkpoint_dir, marker = planted
    path = os.path.join(checkpoint_dir, "model_000001.pt")
    weights = torch.load(path, weights_only=True)
    plant(path, {**weights, "lm_head.weight": Payload(marker)}, record_in_meta=os.path.join(checkpoint_dir, "meta_000001.json"))
    with pytest.raises(DamagedArtifactError, match="model_000001.pt cannot be read: it is not a file of tensors and plain data"):
        load_model("base", "cpu", "eval")
    assert not os.path.exists(marker)


@pytest.mark.parametrize("where", ["train_loader", "rng", "optimizers"])
def test_an_optimizer_shard_with_a_payload_is_refused(planted, where):
    """The shard holds what an exact resume needs, the loader's position and the RNG states included."""
    base_dir, checkpoint_dir, marker = planted
    path = os.path.join(checkpoint_dir, "optim_000001_rank0.pt")
    shard = torch.load(path, weights_only=True)
    shard[where] = Payload(marker) if where != "optimizers" else [{"state": {0: Payload(marker)}, "param_groups": []}]
    plant(path, shard)
    with pytest.raises(DamagedArtifactError, match="optim_000001_rank0.pt cannot be read: it is not a file of tensors"):
        load_checkpoint(checkpoint_dir, 1, "cpu", load_optimizer=True)
    assert not os.path.exists(marker)


def test_token_bytes_with_a_payload_are_refused(planted):
    base_dir, _, marker = planted
    plant(str(base_dir / "tokenizer" / "token_bytes.pt"), Payload(marker))
    with pytest.raises(DamagedArtifactError, match="token_bytes.pt cannot be read: it is not a file of tensors"):
        get_token_bytes()
    assert not os.path.exists(marker)


def test_an_old_pickled_tokenizer_is_never_unpickled(planted):
    """The old format is refused with the way out; conversion reads plain data only, so a payload fails there too."""
    base_dir, _, marker = planted
    tokenizer_dir = base_dir / "tokenizer"
    tokenizer = get_tokenizer()
    # a payload beside today's files: they are what loads, the pickle is never opened
    with open(tokenizer_dir / "tokenizer.pkl", "wb") as f:
        pickle.dump({"pattern": "x", "mergeable_ranks": {}, "extra": Payload(marker)}, f)
    assert get_tokenizer().encode("hello world") == tokenizer.encode("hello world")
    # only the pickle: refused, with the command that converts it
    for name in ("tokenizer.tiktoken", "tokenizer_config.json"):
        os.remove(tokenizer_dir / name)
    with pytest.raises(ValueError, match="old pickle format.*--convert-pickle"):
        get_tokenizer()
    converted = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--convert-pickle", str(tokenizer_dir)],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert converted.returncode != 0 and "a tokenizer pickle holds only plain data" in converted.stderr, converted.stderr
    assert "Traceback" not in converted.stderr and not os.path.exists(marker)
    # an honest old pickle converts to files that encode exactly as before
    with open(tokenizer_dir / "tokenizer.pkl", "wb") as f:
        pickle.dump({"pattern": tokenizer.enc._pat_str, "mergeable_ranks": tokenizer.enc._mergeable_ranks}, f)
    converted = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--convert-pickle", str(tokenizer_dir)],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert converted.returncode == 0, converted.stderr
    text = "Hello <|bos|> 12345 naïve 🙂"
    assert get_tokenizer().encode(text) == tokenizer.encode(text)


def test_a_hostile_meta_is_refused_before_anything_is_built(planted):
    """JSON cannot carry code; what it can carry is a model too big to build or keys nobody wrote."""
    base_dir, checkpoint_dir, _ = planted
    meta_path = os.path.join(checkpoint_dir, "meta_000001.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["model_config"]["__class__"] = "os.system"
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="unknown key '__class__'"):
        load_model("base", "cpu", "eval")


def test_report_markers_are_read_as_text(planted, tmp_path):
    """speedrun.sh greps the markers and the report parses `key: value` lines: shell syntax in them stays text."""
    base_dir, _, marker = planted
    stages = base_dir / "speedrun_stages"
    stages.mkdir()
    (stages / "base.done").write_text(f"stage: base\ncommand: $(mkdir {marker}) `mkdir {marker}`\nseconds: 12\n"
                                      f"finished: 2026-01-01T00:00:00Z\n")
    result = subprocess.run([sys.executable, "-m", "nanochat.report", "generate"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)})
    assert result.returncode == 0, result.stderr
    assert f"$(mkdir {marker})" in (base_dir / "report.md").read_text()
    assert not os.path.exists(marker)


def test_stand_in_data_and_the_core_bundle_are_parsed_as_data(planted):
    """The identity-conversation override is JSON lines; the CORE bundle's YAML is read with safe_load."""
    base_dir, _, marker = planted
    from nanochat.core_eval import load_core_tasks
    from tasks.customjson import CustomJSON, identity_conversations_path

    with open(base_dir / "identity_conversations.jsonl", "wb") as f:
        f.write(pickle.dumps(Payload(marker)) + b"\n")
    with pytest.raises(ValueError, match="identity_conversations.jsonl"):
        CustomJSON(filepath=identity_conversations_path())
    bundle = base_dir / "eval_bundle"
    bundle.mkdir()
    (bundle / "core.yaml").write_text(f"icl_tasks: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(ValueError, match="core.yaml"):
        load_core_tasks(str(bundle))
    assert not os.path.exists(marker)


def test_resuming_from_a_planted_shard_stops_with_one_message(planted):
    """The real entry point: base_train --resume-from-step on a shard whose loader state is a payload."""
    base_dir, checkpoint_dir, marker = planted
    path = os.path.join(checkpoint_dir, "optim_000001_rank0.pt")
    plant(path, {"optimizers": [], "train_loader": Payload(marker), "rng": {"cpu": torch.get_rng_state()}})
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", *TRAIN_FLAGS, "--num-iterations", "2",
                             "--resume-from-step", "1", "--model-tag", "d2"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)})
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "optim_000001_rank0.pt cannot be read: it is not a file of tensors and plain data" in result.stderr
    assert not os.path.exists(marker)
