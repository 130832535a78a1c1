"""
Reinforcement learning on tasks with a checkable answer (GSM8K): GRPO-style policy gradient.

For each question the policy samples a *group* of completions through the Engine (tool use on, one
prefill shared by the group) and the task scores each one: reward 1 when the final answer is right.
The advantage of a completion is its reward minus the mean reward of its group (GRPO, Shao et al.
2024, optionally divided by the group's standard deviation): a completion that beat its siblings is
made more likely, one that lost is made less likely, and a group whose rewards are all equal carries
no signal at all. The group mean is the baseline, so no value network is needed.

We stay strictly on-policy: the samples come from the current weights and feed exactly one
optimizer step. PPO/GRPO's importance ratio is then 1 and its clipping never acts, so the loss is
plain REINFORCE with that baseline:

    loss = - sum over sampled tokens of advantage * log p(token)  /  sampled tokens of the whole step

The normaliser counts the sampled tokens of the whole step on every rank (train_step in
nanochat/training.py does this for every stage), so how the rows are split into micro-batches and
ranks does not change the gradient. Only tokens the policy chose are actions: the prompt and the
tool outputs the engine forced in are masked out; <|assistant_end|> is an action and is kept.
"""
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """One sampled completion: the prompt and completion tokens, which of them the policy sampled, its reward."""
    tokens: list  # prompt + completion, <|assistant_end|> included when the completion ended its turn
    sampled: list  # 1 where the policy chose the token, 0 for prompt and forced tool-output tokens
    reward: float
    tool_calls: int
    advantage: float = 0.0

    @property
    def completion_length(self):
        # tokens the policy chose (forced tool output excluded): the completion length chat_rl logs
        return sum(self.sampled)


def group_advantages(rewards, divide_by_std=False):
    """Reward minus the group mean; divided by the group's std (GRPO) when asked and the std is not 0."""
    rewards = torch.tensor(rewards, dtype=torch.float32)
    advantages = rewards - rewards.mean()
    if divide_by_std:
        # the spread of the group itself, taken as the whole population: no Bessel correction
        std = rewards.std(unbiased=False)
        # all rewards equal: every advantage is already 0, and 0 / 0 would turn them into NaNs
        if std > 0:
            advantages = advantages / std
    return advantages.tolist()


def sample_group(engine, tokenizer, task, conversation, num_samples, max_new_tokens, temperature, top_k, seed,
                 divide_by_std=False):
    """Sample `num_samples` completions of one question, score each with `task.reward`, set their advantages."""
    prompt = tokenizer.render_for_completion(conversation)
    # keep_end_token: ending the turn is one of the policy's actions, so <|assistant_end|> must be in the
    # rollout to be trained on. masks: 1 on each token the policy sampled, 0 on prompt and forced tool output.
    results, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens, temperature=temperature,
                                           top_k=top_k, seed=seed, keep_end_token=True)
    python_start = tokenizer.encode_special("<|python_start|>")
    # the engine ends a reply at either token (Engine.is_reply_end); neither is part of the reply's text
    ends = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    rollouts = []
    for tokens, mask in zip(results, masks):
        completion = tokens[len(prompt):]
        reply = tokenizer.decode([token for token in completion if token not in ends])
        rollouts.append(Rollout(tokens=tokens, sampled=mask, reward=float(task.reward(conversation, reply)),
                                tool_calls=completion.count(python_start)))
    for rollout, advantage in zip(rollouts, group_advantages([r.reward for r in rollouts], divide_by_std)):
        rollout.advantage = advantage
    return rollouts


def policy_gradient_batches(rollouts, rows_per_batch, pad_token, device):
    """
    Micro-batches of (inputs, targets, weights) for train_step: target -1 where the token was not sampled
    (prompt, tool output) or is padding; the weight of every target of a row is the row's advantage.
    """
    batches = []
    for start in range(0, len(rollouts), rows_per_batch):
        chunk = rollouts[start:start + rows_per_batch]
        # a row of n tokens gives n - 1 (input, target) pairs; shorter rows are right-padded to the longest
        length = max(len(r.tokens) for r in chunk) - 1
        inputs = torch.full((len(chunk), length), pad_token, dtype=torch.long)
        targets = torch.full((len(chunk), length), -1, dtype=torch.long)
        weights = torch.zeros((len(chunk), length), dtype=torch.float32)
        for row, rollout in enumerate(chunk):
            tokens = torch.tensor(rollout.tokens, dtype=torch.long)
            # [1:]: the mask belongs to the token predicted, and position t predicts token t+1
            sampled = torch.tensor(rollout.sampled[1:], dtype=torch.bool)
            n = len(rollout.tokens) - 1
            inputs[row, :n] = tokens[:-1]
            targets[row, :n] = torch.where(sampled, tokens[1:], -1)  # position t predicts token t+1
            # one weight for every token of the row: the whole completion is credited with its group-relative
            # reward (no per-token credit assignment); where the target is -1 the weight multiplies a zero loss
            weights[row, :n] = rollout.advantage
        batches.append((inputs.to(device), targets.to(device), weights.to(device)))
    return batches
