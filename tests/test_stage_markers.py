"""
The stage markers speedrun.sh keeps in speedrun_stages/: written atomically, read as plain `key: value` text (shell
syntax in them stays text), matched against the command a rerun would run; the CLI speedrun.sh calls.
"""
import os
import subprocess
import sys

import pytest

from nanochat.stage_markers import (clear_stage_markers, main, read_stage_marker, read_stage_markers, stage_status,
                                    write_stage_marker)
from tests.conftest import REPO_ROOT

COMMAND = ["python", "-m", "scripts.chat_eval", "-i", "rl", "-a", "ARC-Easy|MMLU"]


def test_a_written_marker_reads_back_and_matches_only_its_own_command(tmp_path):
    write_stage_marker(str(tmp_path), "rl-eval", COMMAND, 125.4)
    assert [n for n in os.listdir(tmp_path)] == ["rl-eval.done"]  # no temporary file left beside it
    marker = read_stage_marker(str(tmp_path / "rl-eval.done"))
    assert marker["stage"] == "rl-eval" and marker["command"] == " ".join(COMMAND) and marker["seconds"] == 125
    assert marker["result"] == "done" and marker["finished"] > 0
    assert stage_status(str(tmp_path), "rl-eval", COMMAND) == "done"
    assert stage_status(str(tmp_path), "rl-eval") == "done"  # no command given: any will do
    assert stage_status(str(tmp_path), "rl-eval", COMMAND + ["--max-problems", "4"]) == "changed"
    assert stage_status(str(tmp_path), "sft", COMMAND) == "missing"
    write_stage_marker(str(tmp_path), "base-eval", ["python", "-m", "scripts.base_eval"], 3, result="failed")
    assert stage_status(str(tmp_path), "base-eval", ["python", "-m", "scripts.base_eval"]) == "failed"
    assert sorted(m["stage"] for m in read_stage_markers(str(tmp_path))) == ["base-eval", "rl-eval"]
    clear_stage_markers(str(tmp_path))
    assert read_stage_markers(str(tmp_path)) == [] and stage_status(str(tmp_path), "rl-eval", COMMAND) == "missing"
    with pytest.raises(ValueError, match="a stage name"):
        write_stage_marker(str(tmp_path), "../escape", COMMAND, 1)


def test_a_marker_of_the_earlier_format_still_matches(tmp_path):
    """What speedrun.sh's printf wrote before this module existed: the same `key: value` lines."""
    (tmp_path / "tokenizer.done").write_text("stage: tokenizer\ncommand: python -m scripts.tok_train --vocab-size 2048\n"
                                             "seconds: 62\nfinished: 2026-01-01T09:00:00Z\nresult: done\n")
    assert stage_status(str(tmp_path), "tokenizer", ["python", "-m", "scripts.tok_train", "--vocab-size", "2048"]) == "done"
    assert read_stage_marker(str(tmp_path / "tokenizer.done"))["seconds"] == 62


def test_read_stage_marker_keeps_what_it_needs_and_refuses_the_rest(tmp_path):
    path = tmp_path / "x.done"
    path.write_text("stage: mid\nseconds: 12.5\nextra: ignored\n")  # no finished: the file's time orders it
    marker = read_stage_marker(str(path))
    assert marker["stage"] == "mid" and marker["seconds"] == 12.5 and marker["command"] == ""
    for text in ["seconds: 3\n", "stage: mid\n", "stage: mid\nseconds: -1\n", "stage: mid\nseconds: nan\n"]:
        path.write_text(text)
        assert read_stage_marker(str(path)) is None
    assert read_stage_marker(str(tmp_path / "missing.done")) is None


def test_the_cli_speedrun_calls_keeps_shell_syntax_as_text(tmp_path, capsys):
    planted = tmp_path / "planted"
    command = ["python", "-m", "scripts.tok_eval", f"$(mkdir {planted})", f"`mkdir {planted}`", "--", "--flag"]
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), PYTHONPATH=REPO_ROOT)
    cli = lambda *args: subprocess.run([sys.executable, "-m", "nanochat.stage_markers", *args], cwd=REPO_ROOT, env=env,
                                       capture_output=True, text=True, timeout=60)
    assert cli("status", "tok-eval", "--", *command).stdout == "missing\n"
    written = cli("write", "tok-eval", "--seconds", "7", "--", *command)
    assert written.returncode == 0, written.stderr
    marker_text = (tmp_path / "speedrun_stages" / "tok-eval.done").read_text()
    assert f"command: {' '.join(command)}\n" in marker_text and "seconds: 7\n" in marker_text
    assert cli("status", "tok-eval", "--", *command).stdout == "done\n"
    assert cli("status", "tok-eval", "--", *command[:-1]).stdout == "changed\n"
    assert not planted.exists()
    # in this process too, with --dir; a bad call is a usage error
    main(["--dir", str(tmp_path / "speedrun_stages"), "status", "tok-eval", "--", *command])
    assert capsys.readouterr().out == "done\n"
    main(["--dir", str(tmp_path / "speedrun_stages"), "clear"])
    assert os.listdir(tmp_path / "speedrun_stages") == []
    for argv in (["write", "x", "--seconds", "1"], ["status", "a/b"]):
        with pytest.raises(SystemExit):
            main(["--dir", str(tmp_path)] + argv)
