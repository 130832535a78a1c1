"""
Base pretraining end to end on the embedded sample: the real script in real subprocesses (and under
torchrun with gloo), checkpoints, exact resume, bits per byte, and the loop's helpers.
"""
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint_manager import find_last_step, find_largest_model, load_checkpoint, load_model, save_checkpoint
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.training import get_grad_accum_steps, get_lr_multiplier, is_due

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_LINE = re.compile(r"^step (\d+)/\d+ .*\| loss ([0-9.]+) ", re.M)
VAL_LINE = re.compile(r"^step (\d+) \| val bpb ([0-9.]+)", re.M)
# small enough for 2 shared cores: depth 2 (width 128), 64-token rows, 2 micro-steps of 8 rows per step
TRAIN_FLAGS = ["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "8", "--total-batch-size", "1024",
               "--eval-tokens", "2048", "--sample-every", "-1"]


@pytest.fixture(scope="module")
def trained_base_dir(tmp_path_factory, tiny_tokenizer):
    """A NANOCHAT_BASE_DIR holding the tiny tokenizer (and nothing else yet)."""
    base_dir = tmp_path_factory.mktemp("base")
    tiny_tokenizer.save(os.path.join(base_dir, "tokenizer"))
    return base_dir


def run_script(base_dir, args, torchrun=False, timeout=300):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_DATA="sample", OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [sys.executable]
    command = launcher + ["-m", "scripts.base_train"] + (["--"] if torchrun else []) + args
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def losses_of(log):
    return {int(step): float(loss) for step, loss in LOSS_LINE.findall(log)}


@pytest.mark.slow
def test_loss_falls_and_resume_is_bit_exact(trained_base_dir):
    log = run_script(trained_base_dir, TRAIN_FLAGS + ["--num-iterations", "30", "--eval-every", "30", "--save-every", "10"])
    losses = losses_of(log)
    assert sorted(losses) == list(range(1, 31))
    assert losses[1] == pytest.approx(math.log(512), rel=1e-3)  # zero-initialised head: uniform over the vocab
    assert sum(losses[s] for s in range(26, 31)) / 5 < losses[1] - 1.5, losses
    val = {int(step): float(bpb) for step, bpb in VAL_LINE.findall(log)}
    assert val[30] < val[0] - 0.5, val
    checkpoint_dir = os.path.join(trained_base_dir, "base_checkpoints", "d2")
    assert find_last_step(checkpoint_dir) == 30
    final_weights, _, meta = load_checkpoint(checkpoint_dir, 30, "cpu")
    assert meta["step"] == 30 and meta["val_bpb"] == pytest.approx(val[30], abs=1e-4)

    # resume from the step-10 checkpoint (all that a run killed after that save leaves behind): the same
    # next losses, bit for bit, and the same final weights
    log = run_script(trained_base_dir, TRAIN_FLAGS + ["--num-iterations", "30", "--eval-every", "-1", "--save-every", "10",
                                                     "--resume-from-step", "10"])
    resumed = losses_of(log)
    assert sorted(resumed) == list(range(11, 31))
    for step in range(11, 31):
        assert resumed[step] == losses[step], f"step {step}: {resumed[step]} after resume vs {losses[step]}"
    resumed_weights, _, _ = load_checkpoint(checkpoint_dir, 30, "cpu")
    for name, tensor in final_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
