"""
The speedrun end to end: `NANOCHAT_PROFILE=smoke bash speedrun.sh` runs every stage at the smallest size,
killed during SFT (as a lost node would be) and rerun: the second run skips the finished stages, resumes
SFT from its last checkpoint and finishes, ending with a chat_cli prompt and a chat_web request; a third run
only regenerates the report. This is the suite's one slow test (a few minutes on 2 cores).
"""
import glob
import os
import re
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

TRAINING_STAGES = ["tokenizer", "tokenizer-eval", "base-train", "base-loss", "mid-train", "mid-eval"]


def speedrun_env(base_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOCHAT_", "WANDB_"))}
    env.update(NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_PROFILE="smoke")
    return env


def run_speedrun(base_dir, log_path):
    with open(log_path, "w") as log:
        result = subprocess.run(["bash", "speedrun.sh"], cwd=REPO_ROOT, env=speedrun_env(base_dir), stdout=log,
                                stderr=subprocess.STDOUT, timeout=900)
    output = open(log_path).read()
    assert result.returncode == 0, output[-5000:]
    return output


def stages_run(output):
    """Names of the stages a run actually ran (the script prints '== NAME: COMMAND' before each)."""
    return [m.group(1) for m in re.finditer(r"^== ([\w-]+): python", output, re.MULTILINE)]


def file_states(base_dir):
    """path -> (size, mtime) of every checkpoint and tokenizer file: what a rerun must leave alone."""
    paths = glob.glob(os.path.join(base_dir, "*checkpoints", "*", "*")) + glob.glob(os.path.join(base_dir, "tokenizer", "*"))
    return {p: (os.path.getsize(p), os.path.getmtime(p)) for p in paths}


def test_smoke_speedrun_killed_during_sft_resumes_and_a_third_run_only_writes_the_report(tmp_path):
    base_dir = tmp_path / "base"
    markers = base_dir / "speedrun_stages"

    # first run: kill the whole process tree once SFT has saved a step, the way a lost node stops
    with open(tmp_path / "run1.log", "w") as log:
        first = subprocess.Popen(["bash", "speedrun.sh"], cwd=REPO_ROOT, env=speedrun_env(base_dir), stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        sft_step = base_dir / "chatsft_checkpoints" / "d2" / "meta_000005.json"
        deadline = time.time() + 600
        while not sft_step.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the smoke run ended before SFT saved step 5:\n" + open(tmp_path / "run1.log").read()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finished = {p.stem for p in markers.glob("*.done")}
    assert set(TRAINING_STAGES) <= finished and "sft" not in finished
    before = {name: (markers / f"{name}.done").read_text() for name in TRAINING_STAGES}

    # second run: the finished stages are skipped, SFT resumes from step 5, the rest runs
    second = run_speedrun(base_dir, tmp_path / "run2.log")
    ran = stages_run(second)
    assert ran[0] == "sft" and "sft-eval" in ran and "rl" in ran and "rl-eval" in ran, ran
    assert "resumed from step 5 of" in second
    for name in TRAINING_STAGES:
        assert f"== {name}: finished in an earlier run, skipped" in second
        assert (markers / f"{name}.done").read_text() == before[name]
    # the run ends by talking to the model: one terminal prompt and one request to a started server
    assert "using the rl model" in second
    assert re.search(r"chat_web on http://127\.0\.0\.1:\d+ answered 'Hello' with \d+ tokens", second)
    report = (base_dir / "report.md").read_text()
    for section in ["## Base model training", "## Midtraining", "## Chat SFT", "## Chat RL", "## Stage times", "## Summary"]:
        assert section in report
    assert "offline stand-in" in report
    # chat_eval on the stand-ins labels every score as one, in its section and in the summary table
    section = (base_dir / "report" / "chat-evaluation-sft.md").read_text()
    assert "- WordNet-MC (stand-in): " in section and "- Arithmetic (stand-in): " in section
    assert "not the real benchmarks" in section and "ChatCORE (stand-ins)" in section

    # third run: nothing to do but the report; no checkpoint or tokenizer file is touched
    states = file_states(base_dir)
    third = run_speedrun(base_dir, tmp_path / "run3.log")
    assert stages_run(third) == []
    assert file_states(base_dir) == states
    assert "Report written to" in third
