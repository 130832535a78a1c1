"""
The optimisation step every training stage takes (base, mid, SFT, RL), and the schedules around it.

A stage's loop, written out in its script, is: evaluate when due, save when due, then one train_step.
train_step runs grad_accum_steps micro-batches forward and backward, then every optimizer once:
gradient accumulation makes a step of total_batch_size tokens out of micro-batches that fit in memory,
so one GPU and eight take the same optimizer steps, one just more slowly.

The one idea worth reading twice is the loss normalisation: the loss of a step is the mean over every
target token the step saw, on every rank, whatever the micro-batch split (see train_step's docstring).
"""
import torch
import torch.distributed as dist


def get_grad_accum_steps(total_batch_size, device_batch_size, seq_len, world_size):
    """Micro-steps per optimizer step so that one step sees total_batch_size tokens; errors name the numbers to change."""
    tokens_per_micro_step = device_batch_size * seq_len * world_size
    if total_batch_size % tokens_per_micro_step != 0:
        raise ValueError(
            f"--total-batch-size {total_batch_size} is not a multiple of --device-batch-size {device_batch_size} "
            f"x --max-seq-len {seq_len} x world size {world_size} = {tokens_per_micro_step} tokens; "
            f"set --total-batch-size to a multiple of {tokens_per_micro_step} "
            f"(e.g. {max(1, round(total_batch_size / tokens_per_micro_step)) * tokens_per_micro_step}) or change the others")
    return total_batch_size // tokens_per_micro_step


def get_lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup, flat, then linear warmdown to final_lr_frac (trapezoid schedule)."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def get_muon_momentum(step, warmup_steps=300, start=0.85, end=0.95):
    """Muon's momentum ramps up over the first steps: lower momentum is steadier while the weights move fast."""
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


def set_learning_rates(optimizers, lr_multiplier):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier


def set_muon_momentum(muon, momentum):
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
        loss.backward()
        loss_sum += loss.detach().float()
        num_tokens += (targets >= 0).sum()
        positions += inputs.numel() * world_size
    if world_size > 1:
        totals = torch.stack([loss_sum, num_tokens])
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        loss_sum, num_tokens = totals[0], totals[1]
    num_tokens = num_tokens.clamp(min=1)  # a step whose targets are all masked changes nothing
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, world_size / num_tokens)  # a tensor factor: no wait for the GPU here
    set_learning_rates(optimizers, lr_multiplier)
    if muon_momentum is not None:
        set_muon_momentum(optimizers[1], muon_momentum)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum / num_tokens, positions
