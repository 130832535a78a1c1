"""
The optimisation step every training stage takes (base, mid, SFT, RL), and the schedules around it.

A stage's loop, written out in its script, is: evaluate when due, save when due, then one train_step.
train_step runs grad_accum_steps micro-batches forward and backward, then every optimizer once:
gradient accumulation makes a step of total_batch_size tokens out of micro-batches that fit in memory,
so one GPU and eight take the same optimizer steps, one just more slowly. With base_train's defaults a step
is 524,288 tokens: 8 GPUs x 32 rows x 2048 tokens is one micro-batch each; a single GPU runs 8 in a row.

The one idea worth reading twice is the loss normalisation: the loss of a step is the mean over every
target token the step saw, on every rank, whatever the micro-batch split (see train_step's docstring).
"""
import torch
import torch.distributed as dist


def get_grad_accum_steps(total_batch_size, device_batch_size, seq_len, world_size):
    """Micro-steps per optimizer step so that one step sees total_batch_size tokens; errors name the numbers to change."""
    # an error, not a rounded batch: a run that silently trained with another batch size than it was given
    # would not be the run its flags describe
    tokens_per_micro_step = device_batch_size * seq_len * world_size
    if total_batch_size % tokens_per_micro_step != 0:
        raise ValueError(
            f"--total-batch-size {total_batch_size} is not a multiple of --device-batch-size {device_batch_size} "
            f"x --max-seq-len {seq_len} x world size {world_size} = {tokens_per_micro_step} tokens; "
            f"set --total-batch-size to a multiple of {tokens_per_micro_step} "
            f"(e.g. {max(1, round(total_batch_size / tokens_per_micro_step)) * tokens_per_micro_step}) or change the others")
    return total_batch_size // tokens_per_micro_step


def get_lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """
    Linear warmup, flat, then linear warmdown to final_lr_frac (trapezoid schedule, "warmup-stable-decay").
    Why not cosine: a flat lr for most of the run and a short decay at the end matches it (Hagele et al. 2024),
    and the run length only decides where the decay starts. base_train: no warmup, the last 20% decaying to 0.
    """
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_iters:
        # (step + 1): the very first step already moves the weights, at 1/warmup_iters of the peak
        return (step + 1) / warmup_iters
    if step <= num_iterations - warmdown_iters:
        return 1.0
    # progress falls linearly from 1 where the warmdown starts to 0 at step num_iterations
    progress = (num_iterations - step) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def warmdown_started(step, num_iterations, warmdown_ratio):
    """True once the lr schedule has left its flat part: from here on the horizon must stay as it is."""
    return step > num_iterations - round(warmdown_ratio * num_iterations)


def steps_within_time_budget(steps_done, seconds_spent, seconds_per_step, budget_seconds, max_steps):
    """
    The horizon a time budget allows: the steps done plus those the remaining time fits at the measured
    seconds per step, at most max_steps and at least one more step. Why re-estimate instead of timing a few
    steps once: with no warmup the lr is flat until the warmdown, so the horizon can move freely until then
    (nothing trained so far depended on it), and a later estimate averages over more steps and any slowdown.
    """
    if seconds_per_step <= 0:
        return max_steps
    steps_left = int(max(0.0, budget_seconds - seconds_spent) / seconds_per_step)
    return max(steps_done + 1, min(max_steps, steps_done + steps_left))


def agree_across_ranks(value, device):
    """The smallest of every rank's integer `value`: ranks time their steps slightly differently, and must stop together."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def get_muon_momentum(step, warmup_steps=300, start=0.85, end=0.95):
    """Muon's momentum ramps up over the first steps: lower momentum is steadier while the weights move fast."""
    # 0.85 -> 0.95 linearly over the first 300 steps, then held (as in the modded-nanogpt speedrun)
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


def set_learning_rates(optimizers, lr_multiplier):
    """Every group's lr = its initial_lr (set by GPT.setup_optimizers) x the schedule's multiplier."""
    # from initial_lr, never from the current lr: multiplying the current one would compound step after step
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier


def set_muon_momentum(muon, momentum):
    # read by Muon's step from the group, so changing it here takes effect at the next step
    for group in muon.param_groups:
        group["momentum"] = momentum


def is_due(step, every, last_step):
    """Periodic actions run every `every` steps (never when every <= 0, i.e. -1 = off) and always at the last step."""
    return last_step or (every > 0 and step % every == 0)


def train_step(model, optimizers, batches, grad_accum_steps, autocast_ctx, lr_multiplier, muon_momentum=None):
    """
    One optimizer step: grad_accum_steps micro-batches of (inputs, targets) from `batches`, then every optimizer.
    A micro-batch may carry a third tensor of per-target weights (RL's advantages): its loss is then sum(weight * nll).
    The loss is the mean over ALL target tokens of the step (targets of -1 are ignored), across
    micro-batches and ranks: each micro-batch backpropagates its loss *sum*, and the gradients are scaled
    by world_size / (target tokens of the whole step) at the end (the optimizers average over ranks).
    Averaging per micro-batch instead would weight a token in a short micro-batch more than one in a long
    one, so the batch size, accumulation and world size would change the gradient of masked (SFT) data.
    Returns (the step's mean loss over all ranks as a 0-d tensor: .item() waits for the step to finish,
    the number of token positions processed over all ranks, padding included: what tok/s and MFU count).
    """
    device = next(model.parameters()).device
    # running sums kept on the device: adding .item()s would make the CPU wait for the GPU at every micro-batch
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    num_tokens = torch.zeros((), device=device, dtype=torch.float32)
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    positions = 0
    for _ in range(grad_accum_steps):
        inputs, targets, *token_weights = next(batches)
        with autocast_ctx:
            if token_weights:  # RL: each target's loss is weighted by its advantage (nanochat/rl.py)
                loss = (model(inputs, targets, loss_reduction="none").float() * token_weights[0]).sum()
            else:
                loss = model(inputs, targets, loss_reduction="sum")
        # backward outside autocast (it runs each op in the dtype its forward used); gradients add up in .grad
        # over the micro-batches, which is what accumulation is
        loss.backward()
        loss_sum += loss.detach().float()
        num_tokens += (targets >= 0).sum()
        positions += inputs.numel() * world_size
    if world_size > 1:
        # one all_reduce for both sums: every rank then divides by the same token count of the whole step
        totals = torch.stack([loss_sum, num_tokens])
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        loss_sum, num_tokens = totals[0], totals[1]
    num_tokens = num_tokens.clamp(min=1)  # a step whose targets are all masked changes nothing
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # x world_size because the optimizers average the gradients over ranks: (sum over ranks / W) x W / N is the
    # gradient of the step's mean loss. A tensor factor: no wait for the GPU here.
    torch._foreach_mul_(grads, world_size / num_tokens)
    set_learning_rates(optimizers, lr_multiplier)
    if muon_momentum is not None:
        # GPT.setup_optimizers returns [adamw, muon]
        set_muon_momentum(optimizers[1], muon_momentum)
    for opt in optimizers:
        opt.step()
    # None, not zeros: the memory is freed until the next backward, which then writes the gradients instead of adding
    model.zero_grad(set_to_none=True)
    return loss_sum / num_tokens, positions
