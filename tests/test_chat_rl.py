"""
RL (nanochat/rl.py, scripts/chat_rl.py): advantages and masks on hand-made groups, no gradient through tool
outputs, a tiny model that learns a trivially rewarded task, and the script: bit-exact resume, torchrun
2 ranks == 1 process, then chat_eval -i rl and chat_cli picking the RL model.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from nanochat.engine import Engine
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.rl import Rollout, group_advantages, policy_gradient_batches, sample_group
from nanochat.training import train_step
from test_chat_train import REPO_ROOT, run_script

RL_LOSS_LINE = re.compile(r"^step (\d+)/\d+ .*\| loss (-?[0-9.]+) .*\| reward ([0-9.]+) ", re.M)
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def test_advantages_are_reward_minus_group_mean_optionally_over_std():
    assert group_advantages([1, 0, 0, 1]) == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([1, 1, 1]) == [0.0, 0.0, 0.0]  # a flat group teaches nothing
    assert group_advantages([0, 0, 0, 1]) == pytest.approx([-0.25, -0.25, -0.25, 0.75])
    # GRPO's std normalisation: std of [0, 0, 0, 1] is sqrt(3)/4
    assert group_advantages([0, 0, 0, 1], divide_by_std=True) == pytest.approx([-1 / 3 ** 0.5] * 3 + [3 ** 0.5])
    assert group_advantages([2, 2], divide_by_std=True) == [0.0, 0.0]  # std 0: left alone, no division by zero


def test_batches_train_only_on_sampled_tokens_weighted_by_advantage():
    # prompt of 3 tokens; completion: 2 sampled, 2 forced (tool output), 1 sampled
    first = Rollout(tokens=[10, 11, 12, 20, 21, 30, 31, 22], sampled=[0, 0, 0, 1, 1, 0, 0, 1], reward=1.0, tool_calls=1, advantage=0.5)
    second = Rollout(tokens=[10, 11, 12, 23], sampled=[0, 0, 0, 1], reward=0.0, tool_calls=0, advantage=-0.5)
    [(inputs, targets, weights)] = policy_gradient_batches([first, second], rows_per_batch=2, pad_token=0, device="cpu")
    assert inputs.tolist() == [[10, 11, 12, 20, 21, 30, 31], [10, 11, 12, 0, 0, 0, 0]]
    # position t predicts token t+1: only 20, 21 and 22 of the first row and 23 of the second are targets
    assert targets.tolist() == [[-1, -1, 20, 21, -1, -1, 22], [-1, -1, 23, -1, -1, -1, -1]]
    assert weights[0].tolist() == [0.5] * 7 and weights[1, :3].tolist() == [-0.5] * 3
    batches = policy_gradient_batches([first, second], rows_per_batch=1, pad_token=0, device="cpu")
    assert [b[0].shape for b in batches] == [(1, 7), (1, 3)]  # each micro-batch is padded only to its own longest row


def tiny_model(tokenizer, depth=1, seed=0):
    torch.manual_seed(seed)
    model = GPT(model_config_from_depth(depth, tokenizer.get_vocab_size(), 128))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # zero-initialised layers would leave some gradients exactly 0
    return model


def test_forced_tool_output_tokens_get_no_gradient(tiny_tokenizer):
    """The weighted loss equals -advantage * log p summed over the sampled tokens alone, gradients included."""
    tokens = tiny_tokenizer.encode("The cat sat on the mat while the birds sang over the green hills")[:10]
    sampled = [0, 0, 0, 1, 1, 0, 0, 0, 1, 1]
    assert len(tokens) == len(sampled)
    rollout = Rollout(tokens=tokens, sampled=sampled, reward=1.0, tool_calls=1, advantage=0.75)

    def gradients(batch_sampled):
        model = tiny_model(tiny_tokenizer)
        batch = policy_gradient_batches([dataclasses.replace(rollout, sampled=batch_sampled)], 1, 0, "cpu")
        loss = sum((model(inputs, targets, loss_reduction="none") * weights).sum() for inputs, targets, weights in batch)
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    model = tiny_model(tiny_tokenizer)
    ids = torch.tensor([tokens])
    log_probs = torch.log_softmax(model(ids[:, :-1]), dim=-1)[0]
    manual = sum(-0.75 * log_probs[t - 1, tokens[t]] for t in range(1, len(tokens)) if sampled[t])
    manual.backward()
    ours = gradients(sampled)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-4)
    # had the forced tokens been trained on, the gradient would differ (so this test can fail)
    everything = gradients([0, 0, 0] + [1] * (len(tokens) - 3))
    assert not torch.allclose(everything["lm_head.weight"], ours["lm_head.weight"])


class AnswerSeven:
    """A trivially learnable rewarded task: any reply containing a '7' earns 1 (through `reward`, the RL hook
    a Task may override; it has no `evaluate`, so sampling must ask for the reward)."""

    def __getitem__(self, index):
        return {"messages": [{"role": "user", "content": f"Say a number ({index})"}, {"role": "assistant", "content": "7"}]}

    def reward(self, conversation, reply):
        return float("7" in reply)


@pytest.mark.slow
def test_policy_gradient_raises_the_reward_of_a_tiny_model(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer)
    optimizers = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0)
    engine, task = Engine(model, tiny_tokenizer), AnswerSeven()
    rewards = []
    for step in range(20):
        model.eval()
        rollouts = []
        for question in range(8):
            rollouts += sample_group(engine, tiny_tokenizer, task, task[question], 8, 4, 1.0, None, seed=1000 * step + question)
        model.train()
        batches = policy_gradient_batches(rollouts, 16, tiny_tokenizer.get_bos_token_id(), "cpu")
        train_step(model, optimizers, iter(batches), len(batches), NO_AUTOCAST, 1.0)
        rewards.append(sum(r.reward for r in rollouts) / len(rollouts))
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert start < 0.1 and end > start + 0.5, rewards


# ---------------------------------------------------------------------------- the script, end to end

@pytest.fixture(scope="module")
def rl_base_dir(tmp_path_factory, tiny_tokenizer):
    """
    A NANOCHAT_BASE_DIR with an "SFT" model that answers GSM8K-format leg-counting problems right about a
    fifth of the time (25 supervised steps): enough for groups with different rewards, so RL has a signal.
    """
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.dataloader import SFTLoader
    from tasks.gsm8k import GSM8K

    base_dir = tmp_path_factory.mktemp("rl")
    tiny_tokenizer.save(os.path.join(base_dir, "tokenizer"))
    problems = base_dir / "legs.jsonl"
    problems.write_text("".join(json.dumps({"question": f"How many legs do {n} birds have?",
                                            "answer": f"Each bird has 2 legs.\n#### {2 * n}"}) + "\n" for n in range(2, 12)))
    task = GSM8K("main", "train", path=str(problems))
    torch.manual_seed(0)
    config = dataclasses.replace(model_config_from_depth(2, tiny_tokenizer.get_vocab_size(), 256), value_embeds=True)
    model = GPT(config)
    model.init_weights()
    optimizers = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0)
    loader = SFTLoader([task[i] for i in range(len(task))], tiny_tokenizer, 4, 256, 1, device="cpu")
    for _ in range(25):
        train_step(model, optimizers, loader, 1, NO_AUTOCAST, 1.0, 0.95)
    save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", "d2"), 25, model.state_dict(), None,
                    {"step": 25, "model_config": dataclasses.asdict(config)})
    return base_dir


def rl_flags(base_dir):
    problems = str(base_dir / "legs.jsonl")
    return ["--train-file", problems, "--test-file", problems, "--examples-per-step", "2", "--num-samples", "4",
            "--max-new-tokens", "24", "--device-batch-size", "4", "--eval-examples", "4", "--eval-samples", "2", "--dtype", "float32"]


def rl_losses(log):
    return {int(step): (float(loss), float(reward)) for step, loss, reward in RL_LOSS_LINE.findall(log)}


@pytest.mark.slow
def test_rl_script_learns_resumes_bit_exact_then_chat_eval_on_a_task_file(rl_base_dir):
    from nanochat.checkpoint_manager import load_checkpoint

    # --deterministic: the flag in the stage that samples (eager either way, so bit for bit with or without it)
    flags = rl_flags(rl_base_dir) + ["--num-iterations", "4", "--save-every", "2", "--eval-every", "2", "--deterministic"]
    log = run_script(rl_base_dir, "scripts.chat_rl", flags)
    assert "deterministic: torch.use_deterministic_algorithms(True)" in log
    steps = rl_losses(log)
    assert sorted(steps) == [1, 2, 3, 4]
    assert any(loss != 0.0 for loss, _ in steps.values()), "no group had different rewards: the test has no signal"
    assert "pass@1 on held-out problems" in log and "rollout tok/s" in log and "flat groups" in log
    checkpoint_dir = os.path.join(rl_base_dir, "chatrl_checkpoints", "d2")
    final, _, meta = load_checkpoint(checkpoint_dir, 4, "cpu")
    assert meta["source"] == {"stage": "sft", "model_tag": "d2", "step": 25} and set(meta["history"]) == {"0", "2", "4"}
    section = open(os.path.join(rl_base_dir, "report", "chat-rl.md")).read()
    assert "pass@1 before RL" in section and "pass@1 after RL" in section

    resumed = rl_losses(run_script(rl_base_dir, "scripts.chat_rl", flags + ["--resume-from-step", "2"]))
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == steps[step], f"step {step}: {resumed[step]} after resume vs {steps[step]}"
    again, _, _ = load_checkpoint(checkpoint_dir, 4, "cpu")
    for name, tensor in final.items():
        assert torch.equal(again[name], tensor), name

    env = dict(os.environ, NANOCHAT_BASE_DIR=str(rl_base_dir), PYTHONPATH=REPO_ROOT)
    env.pop("NANOCHAT_DATA", None)  # a real benchmark's file, not the stand-ins
    result = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "-i", "rl", "-a", "GSM8K", "--task-file",
                             f"GSM8K={rl_base_dir / 'legs.jsonl'}", "--max-new-tokens", "24"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "GSM8K" in result.stdout, result.stderr[-2000:]
    # chat_cli picking the RL model: tests/test_speedrun.py


@pytest.mark.slow
def test_rl_under_torchrun_matches_one_process(rl_base_dir):
    """The questions of a step are dealt across 2 ranks; the loss is normalised over the whole step: same update."""
    from nanochat.checkpoint_manager import load_checkpoint

    flags = rl_flags(rl_base_dir) + ["--num-iterations", "1", "--eval-every", "-1", "--eval-examples", "2", "--model-tag", "d2"]
    checkpoint_dir = os.path.join(rl_base_dir, "chatrl_checkpoints", "d2")
    distributed = rl_losses(run_script(rl_base_dir, "scripts.chat_rl", flags, torchrun=True))
    distributed_weights, _, _ = load_checkpoint(checkpoint_dir, 1, "cpu")
    single = rl_losses(run_script(rl_base_dir, "scripts.chat_rl", flags))
    single_weights, _, _ = load_checkpoint(checkpoint_dir, 1, "cpu")
    assert sorted(distributed) == [1] and single[1][0] != 0.0, single
    assert distributed[1][1] == single[1][1]  # the same rollouts: the same mean reward
    assert distributed[1][0] == pytest.approx(single[1][0], abs=1e-5)
    for name, tensor in single_weights.items():
        torch.testing.assert_close(distributed_weights[name], tensor, atol=1e-4, rtol=1e-4)
