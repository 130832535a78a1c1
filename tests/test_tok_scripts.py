"""tok_train and tok_eval end to end on the embedded sample, as a user runs them."""
import os
import subprocess
import sys

from conftest import REPO_ROOT

from nanochat.tokenizer import RustBPETokenizer


def run_module(module, *args, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_DATA="sample")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_tok_train_then_tok_eval_offline(tmp_path):
    result = run_module("scripts.tok_train", "--max-chars", "300000", "--vocab-size", "600", base_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Trained on" in result.stdout
    tokenizer = RustBPETokenizer.from_directory(str(tmp_path / "tokenizer"))
    assert tokenizer.get_vocab_size() == 600
    assert (tmp_path / "tokenizer" / "token_bytes.pt").exists()
    section = (tmp_path / "report" / "tokenizer-training.md").read_text()
    assert "- vocab size: 600" in section and "- characters:" in section

    result = run_module("scripts.tok_eval", "--data-chars", "20000", base_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for label in ("english", "code", "math", "korean"):
        assert label in lines
    # columns: ours, gpt2, gpt4; GPT-2/GPT-4 need the network, so offline they say so instead of crashing
    for label in ("english", "train", "val"):
        columns = lines[label].split()[-3:]
        assert float(columns[0]) > 1.0
        assert all(c == "unavailable" or float(c) > 1.0 for c in columns[1:])
    assert (tmp_path / "report" / "tokenizer-evaluation.md").exists()


def test_tok_train_rejects_bad_flags(tmp_path):
    result = run_module("scripts.tok_train", "--max-chars", "0", base_dir=tmp_path)
    assert result.returncode != 0
    assert "--max-chars and --doc-cap must be positive" in result.stderr
