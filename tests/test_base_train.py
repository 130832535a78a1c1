"""
Base pretraining end to end on the embedded sample: the real script in real subprocesses (and under
torchrun with gloo), checkpoints, exact resume, bits per byte, and the loop's helpers.
"""
import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint_manager import find_last_step, find_largest_model, load_checkpoint, load_model, save_checkpoint
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.training import get_grad_accum_steps, get_lr_multiplier, is_due, steps_within_time_budget, warmdown_started

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_LINE = re.compile(r"^step (\d+)/\d+ .*\| loss ([0-9.]+) ", re.M)
VAL_LINE = re.compile(r"^step (\d+) \| val bpb ([0-9.]+)", re.M)
# small enough for 2 shared cores: depth 2 (width 128), 64-token rows, 2 micro-steps of 8 rows per step;
# eager (--compile 0) so that a CPU with AMX does not spend a minute compiling each run, and because eager is
# what resumes bit for bit without --deterministic (the compiled path: test_compiled_bf16_...)
TRAIN_FLAGS = ["--depth", "2", "--max-seq-len", "64", "--device-batch-size", "8", "--total-batch-size", "1024",
               "--eval-tokens", "2048", "--sample-every", "-1", "--compile", "0"]


@pytest.fixture(scope="module")
def trained_base_dir(tmp_path_factory, tiny_tokenizer):
    """A NANOCHAT_BASE_DIR holding the tiny tokenizer (and nothing else yet)."""
    base_dir = tmp_path_factory.mktemp("base")
    tiny_tokenizer.save(os.path.join(base_dir, "tokenizer"))
    return base_dir


def run_script(base_dir, args, torchrun=False, timeout=300, threads=1):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_DATA="sample", OMP_NUM_THREADS=str(threads), PYTHONPATH=REPO_ROOT)
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
    resumed_weights, _, resumed_meta = load_checkpoint(checkpoint_dir, 30, "cpu")
    for name, tensor in final_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    # the report's "Initial val bpb" is still the first run's step-0 eval, not the resumed run's first one
    assert resumed_meta["initial_val_bpb"] == pytest.approx(val[0], abs=1e-4) and val[0] > val[30] + 0.5


@pytest.mark.slow
def test_compiled_bf16_is_bit_exact_with_deterministic_and_close_without(trained_base_dir):
    """
    The path a CPU with AMX takes by default (--dtype auto --compile auto: bf16, torch.compile), forced here and
    tiny (compiling is most of its time), on 2 threads: with one, the compiled embedding backward's atomic adds
    never race, and the difference this guards against cannot happen (dev/BENCHMARKS.md, "Determinism").
    --deterministic: two fresh runs and a resume give the same bits. Without it, a resume is the same run up to
    rounding: close, not equal.
    """
    # depth 1: the same kernels as depth 2 (embedding and value-embedding backwards included), compiled in ~30 s
    # instead of ~45 on 2 cores; the later runs find them in inductor's cache
    flags = ["--depth", "1", "--max-seq-len", "64", "--device-batch-size", "8", "--total-batch-size", "1024", "--eval-tokens", "2048",
             "--sample-every", "-1", "--compile", "1", "--dtype", "bfloat16", "--num-iterations", "10", "--eval-every", "-1",
             "--save-every", "5"]
    checkpoints = os.path.join(trained_base_dir, "base_checkpoints")

    def deterministic_run(tag, *extra):
        log = run_script(trained_base_dir, flags + ["--deterministic", "--model-tag", tag, *extra], threads=2)
        assert "deterministic: torch.use_deterministic_algorithms(True)" in log and "compiling the model" in log
        return losses_of(log), load_checkpoint(os.path.join(checkpoints, tag), 10, "cpu")[0]

    losses, weights = deterministic_run("det")
    again = deterministic_run("det_again")
    resumed = deterministic_run("det", "--resume-from-step", "5")
    assert sorted(losses) == sorted(again[0]) == list(range(1, 11)) and sorted(resumed[0]) == list(range(6, 11))
    for other_losses, other_weights in (again, resumed):
        for step, loss in other_losses.items():
            assert loss == losses[step], f"step {step}: {loss} vs {losses[step]}"
        for name, tensor in weights.items():
            assert torch.equal(other_weights[name], tensor), name

    # the same checkpoint resumed without --deterministic: the same run up to rounding. Measured: losses within
    # ~1e-3, weights 0.1-2% apart on average, a few embedding entries by up to ~0.8 (AdamW steps an entry by ~lr
    # whatever its gradient's size, so one whose gradient is mostly rounding can step either way). A resume
    # that lost its state would be ~100% apart
    log = run_script(trained_base_dir, flags + ["--model-tag", "det", "--resume-from-step", "5"], threads=2)
    assert "deterministic:" not in log
    resumed_losses = losses_of(log)
    assert sorted(resumed_losses) == list(range(6, 11))
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(losses[step], abs=2e-3), step
    rerun = load_checkpoint(os.path.join(checkpoints, "det"), 10, "cpu")[0]
    for name, tensor in weights.items():
        assert (rerun[name] - tensor).abs().mean() < 0.1 * tensor.abs().mean(), name


@pytest.mark.slow
def test_torchrun_matches_one_process_with_twice_the_accumulation(trained_base_dir, tiny_tokenizer, monkeypatch):
    """
    2 ranks x 1 micro-step (gloo, DistMuon/DistAdamW) == 1 process x 2 micro-steps over the same two data shards.
    In fp32: this checks the distributed maths, which bf16 rounding (batched vs per-matrix) would blur.
    """
    steps = 3
    log = run_script(trained_base_dir, TRAIN_FLAGS + ["--num-iterations", str(steps), "--eval-every", "-1",
                                                     "--model-tag", "dist", "--dtype", "float32"], torchrun=True)
    dist_losses = losses_of(log)
    checkpoint_dir = os.path.join(trained_base_dir, "base_checkpoints", "dist")
    assert os.path.exists(os.path.join(checkpoint_dir, f"optim_{steps:06d}_rank1.pt"))  # every rank saved its shard
    dist_weights, _, _ = load_checkpoint(checkpoint_dir, steps, "cpu")

    # the same run in this process: one loader per rank's shard, gradients accumulated over both
    from nanochat.cpu_autograd import CPU_TRAINING_OPS
    from nanochat.dataloader import PretrainLoader
    from nanochat.training import get_muon_momentum, set_learning_rates, set_muon_momentum

    monkeypatch.setenv("NANOCHAT_DATA", "sample")  # not os.environ: it would leak into later tests
    torch.manual_seed(42)  # what compute_init seeds
    with torch.device("meta"):
        model = GPT(dataclasses.replace(model_config_from_depth(2, tiny_tokenizer.get_vocab_size(), 64), value_embeds=True))
    model.to_empty(device="cpu")
    model.init_weights()
    model.use_ops(CPU_TRAINING_OPS)  # as the script trains on a CPU (training_setup.prepare_model)
    optimizers = model.setup_optimizers(compute_dtype=torch.float32)
    loaders = [PretrainLoader(tiny_tokenizer, 8, 64, "train", rank=r, world_size=2) for r in range(2)]
    for step in range(steps):
        total = 0.0
        for loader in loaders:
            inputs, targets = next(loader)
            loss = model(inputs, targets) / 2
            total += loss.item()
            loss.backward()
        set_learning_rates(optimizers, get_lr_multiplier(step, steps, 0.0, 0.2, 0.0))
        set_muon_momentum(optimizers[1], get_muon_momentum(step))
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        assert dist_losses[step + 1] == pytest.approx(total, abs=1e-5)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(dist_weights[name], tensor, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path):
    """A process that dies half way through writing step 2 (a real os._exit mid-pickle) leaves step 1 intact."""
    checkpoint_dir = tmp_path / "d1"
    model = {"w": torch.arange(6.0)}
    save_checkpoint(str(checkpoint_dir), 1, model, {"optimizers": []}, {"step": 1})
    crasher = f"""
import os, torch
from nanochat.checkpoint_manager import save_checkpoint
class DieWhilePickled:
    def __reduce__(self):
        os._exit(3)
save_checkpoint({str(checkpoint_dir)!r}, 2, {{"w": torch.zeros(1000), "x": DieWhilePickled()}}, None, {{"step": 2}})
"""
    result = subprocess.run([sys.executable, "-c", crasher], cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert result.returncode == 3
    assert find_last_step(str(checkpoint_dir)) == 1
    model_data, optimizer_data, meta = load_checkpoint(str(checkpoint_dir), 1, "cpu", load_optimizer=True)
    assert torch.equal(model_data["w"], model["w"]) and meta == {"step": 1} and optimizer_data == {"optimizers": []}
    # a crash while overwriting the SAME step keeps the old file whole too
    crasher_same_step = crasher.replace("save_checkpoint(" + repr(str(checkpoint_dir)) + ", 2", "save_checkpoint(" + repr(str(checkpoint_dir)) + ", 1")
    assert subprocess.run([sys.executable, "-c", crasher_same_step], cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT)).returncode == 3
    assert torch.equal(load_checkpoint(str(checkpoint_dir), 1, "cpu")[0]["w"], model["w"])


def test_checkpoint_errors_list_what_exists(tmp_path, base_dir):
    checkpoint_dir = base_dir / "base_checkpoints" / "d3"
    for step in (5, 10):
        save_checkpoint(str(checkpoint_dir), step, {"w": torch.zeros(1)}, None, {"step": step})
    (base_dir / "base_checkpoints" / "d12").mkdir()
    assert find_largest_model(str(base_dir / "base_checkpoints")) == "d12"
    assert find_last_step(str(checkpoint_dir)) == 10
    with pytest.raises(FileNotFoundError, match=r"available steps: \[5, 10\]"):
        load_checkpoint(str(checkpoint_dir), 7, "cpu")
    with pytest.raises(FileNotFoundError, match=r"available tags: \['d12', 'd3'\]"):
        load_model("base", "cpu", "eval", model_tag="d99")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_model("base", "cpu", "eval", model_tag="d12")
    with pytest.raises(FileNotFoundError, match="optim_000010_rank1.pt is missing"):
        load_checkpoint(str(checkpoint_dir), 10, "cpu", load_optimizer=True, rank=1)


def test_evaluate_bpb_counts_bytes_and_skips_specials():
    torch.manual_seed(0)
    model = GPT(model_config_from_depth(1, 16, 8))
    model.init_weights()  # zero head: every token costs ln(16) nats
    token_bytes = torch.tensor([1, 2, 3, 4] * 3 + [0, 0, 0, 0])  # ids 12..15 are specials
    inputs = torch.randint(0, 16, (2, 8))
    targets = torch.tensor([[0, 1, 2, 3, 12, -1, -1, -1], [4, 5, 6, 7, 8, 9, 10, 11]])
    bpb = evaluate_bpb(model, iter([(inputs, targets)] * 2), 2, token_bytes)
    counted = 4 + 8  # -1 targets and the special token are left out
    num_bytes = (1 + 2 + 3 + 4) + (1 + 2 + 3 + 4) * 2
    assert bpb == pytest.approx(counted * math.log(16) / (math.log(2) * num_bytes), rel=1e-5)


def test_grad_accum_and_schedule_helpers():
    assert get_grad_accum_steps(524288, 32, 2048, 8) == 1
    assert get_grad_accum_steps(524288, 16, 2048, 1) == 16
    with pytest.raises(ValueError, match=r"multiple of 49152"):
        get_grad_accum_steps(100000, 12, 2048, 2)
    lrm = [get_lr_multiplier(s, 100, 0.1, 0.2, 0.0) for s in range(101)]
    assert lrm[0] == pytest.approx(0.1) and lrm[9] == 1.0 and lrm[50] == 1.0 and lrm[80] == 1.0
    assert lrm[90] == pytest.approx(0.5) and lrm[100] == 0.0
    assert is_due(10, 5, False) and not is_due(11, 5, False) and not is_due(10, -1, False) and is_due(7, -1, True)



def test_time_budget_horizon_helpers():
    # 100 s spent of 160, 2 s a step: 30 more steps fit
    assert steps_within_time_budget(50, 100.0, 2.0, 160.0, 10_000) == 80
    assert steps_within_time_budget(50, 100.0, 2.0, 160.0, 60) == 60  # never past the flags' horizon
    assert steps_within_time_budget(50, 200.0, 2.0, 160.0, 10_000) == 51  # over budget: one more step, then the end
    assert steps_within_time_budget(0, 0.0, 0.0, 160.0, 500) == 500  # no step time yet: the cap
    # the lr is flat through step 80 of 100 (warmdown 0.2), so the horizon may move until then and not after
    assert not warmdown_started(80, 100, 0.2) and warmdown_started(81, 100, 0.2)


@pytest.mark.slow
def test_time_budget_sets_the_horizon_from_the_step_time(trained_base_dir):
    budget_minutes = 0.2
    log = run_script(trained_base_dir, TRAIN_FLAGS + ["--time-budget", str(budget_minutes), "--eval-every", "-1",
                                                     "--model-tag", "budget"])
    # the cap is the Chinchilla horizon (thousands of steps here); the budget stops the run long before it
    cap = int(re.search(r"^steps: ([0-9,]+) ", log, re.M).group(1).replace(",", ""))
    fixed = int(re.search(r"horizon is fixed at ([0-9,]+) steps", log).group(1).replace(",", ""))
    losses = losses_of(log)
    assert max(losses) == fixed and sorted(losses) == list(range(1, fixed + 1)) and 10 < fixed < cap // 4, (fixed, cap)
    # the steps fill the budget: the time they took is the budget give or take the noise of this machine
    seconds = sum(float(ms) / 1000 for ms in re.findall(r"\| dt (\d+)ms \|", log))
    assert 0.6 * 60 * budget_minutes < seconds < 1.5 * 60 * budget_minutes, seconds
    # the lr still decays to 0 over the last 20% of the steps it chose: the horizon was fixed before the warmdown
    lrm = {int(step): float(value) for step, value in re.findall(r"^step (\d+)/\d+ .*\| lrm ([0-9.]+) ", log, re.M)}
    assert lrm[round(0.7 * fixed)] == 1.0 and lrm[fixed] < 0.2, lrm
    _, _, meta = load_checkpoint(os.path.join(trained_base_dir, "base_checkpoints", "budget"), fixed, "cpu")
    assert meta["num_iterations"] == fixed



def test_compile_is_used_where_it_was_measured_to_win():
    import types

    from nanochat.cpu_autograd import CPU_TRAINING_OPS
    from nanochat.gpt import PLAIN_OPS
    from nanochat.training_setup import prepare_model, should_compile

    compute = lambda device, dtype: types.SimpleNamespace(device=torch.device(device), dtype=dtype)
    assert not should_compile(compute("cpu", torch.float32))  # fp32 CPU: a wash, skipped
    assert should_compile(compute("cpu", torch.bfloat16))  # AMX bf16: faster steps
    assert should_compile(compute("cuda", torch.bfloat16)) and should_compile(compute("cuda", torch.float32))
    assert not should_compile(compute("cpu", torch.bfloat16), dynamic=True)  # SFT's changing shapes
    assert should_compile(compute("cpu", torch.float32), "1")
    assert not should_compile(compute("cpu", torch.bfloat16), "0")
    model = GPT(model_config_from_depth(1, 64, 8))
    assert prepare_model(model, compute("cpu", torch.float32)) is model
    assert model.ops is CPU_TRAINING_OPS  # on a CPU the speed layer of hand-written backwards is plugged in
    assert prepare_model(model, compute("cpu", torch.float32), "1") is not model  # a compiled wrapper (compiles lazily)
    gpu_model = GPT(model_config_from_depth(1, 64, 8))
    prepare_model(gpu_model, compute("cuda", torch.bfloat16), "0")
    assert gpu_model.ops is PLAIN_OPS  # on a GPU the plain ops, which torch.compile fuses
