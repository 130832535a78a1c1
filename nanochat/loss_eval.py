"""
Bits per byte: the validation loss that does not depend on the tokenizer.

Mean cross-entropy per token changes when the vocabulary changes; summing the loss in bits over
the predicted tokens and dividing by the number of UTF-8 bytes those tokens stand for does not,
so models with different tokenizers can be compared.
"""
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    model: the GPT (or its compiled wrapper); batches: iterator of (inputs, targets);
    steps: how many batches to take; token_bytes: int tensor [vocab] of byte lengths.
    Targets of -1 and special tokens (0 bytes) are left out of both sums. Sums over all ranks.
    """
    total_nats, total_bytes = None, None
    batch_iter = iter(batches)
    for _ in range(steps):
        inputs, targets = next(batch_iter)
        loss = model(inputs, targets, loss_reduction="none").reshape(-1).float()
        targets = targets.reshape(-1)
        valid = targets >= 0
        num_bytes = torch.where(valid, token_bytes.to(targets.device)[targets.clamp(min=0)], 0)
        counted = num_bytes > 0
        nats = torch.where(counted, loss, 0.0).sum()
        nbytes = num_bytes.sum()
        total_nats = nats if total_nats is None else total_nats + nats
        total_bytes = nbytes if total_bytes is None else total_bytes + nbytes
    if total_nats is None:
        raise ValueError("evaluate_bpb needs at least one step; raise --eval-tokens")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes)
