"""chat_cli as a real subprocess against a tiny random checkpoint: one-shot, interactive memory, clear, quit, errors."""
import os
import subprocess
import sys

import pytest

from test_chat_web import save_tiny_model

# every test here talks to a real subprocess that imports torch and loads a model (seconds each)
pytestmark = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cli_base_dir(tiny_tokenizer, tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("cli_base")
    save_tiny_model(str(base_dir), tiny_tokenizer, sequence_len=512)
    return base_dir


def run_cli(base_dir, args, stdin=""):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", *args], input=stdin.encode(),
                             cwd=REPO_ROOT, env=env, capture_output=True, timeout=120)
    return process.returncode, process.stdout.decode("utf-8"), process.stderr.decode("utf-8")  # strict: no half characters


def test_one_shot_prompt(cli_base_dir):
    code, out, err = run_cli(cli_base_dir, ["-p", "Hello there", "-t", "0", "--max-tokens", "12"])
    assert code == 0, err
    assert out.strip(), "a reply is printed"


def test_interactive_keeps_the_conversation_until_clear(cli_base_dir):
    stdin = "hello\nhello\nclear\nhello\nquit\nnever asked\n"
    code, out, err = run_cli(cli_base_dir, ["-t", "0", "--max-tokens", "12"], stdin)
    assert code == 0, err
    assert "(conversation cleared)" in out
    replies = [part.split("\nUser:")[0].strip() for part in out.split("Assistant: ")[1:]]
    assert len(replies) == 3, out  # `quit` ended the session before the last line
    assert replies[0] == replies[2], "after clear, the same question in a fresh conversation gets the same greedy reply"
    assert replies[1] != replies[0], "the second turn sees the first one"


def test_bad_arguments_and_missing_model_give_clear_errors(tmp_path):
    code, _, err = run_cli(tmp_path, ["-t", "-1"])
    assert code == 2 and "--temperature" in err
    code, _, err = run_cli(tmp_path, ["-p", "hi"])  # no -i and nothing trained yet
    assert code != 0 and "no checkpoint of any stage" in err and "speedrun.sh" in err and "Traceback" not in err
    code, _, err = run_cli(tmp_path, ["-p", "hi", "-i", "sft"])
    assert code != 0 and "cannot load the sft model" in err and "Traceback" not in err
