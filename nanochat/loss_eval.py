"""
Bits per byte: the validation loss that does not depend on the tokenizer.

Mean cross-entropy per token changes when the vocabulary changes; summing the loss in bits over
the predicted tokens and dividing by the number of UTF-8 bytes those tokens stand for does not,
so models with different tokenizers can be compared.

Why: a model's total loss on a text, in bits, is the length of that text compressed with the model
(arithmetic coding), whatever the tokens are. A bigger vocabulary puts more bytes in each token, so
each token is harder to predict and the per-token loss goes up, but the bits for the whole text do
not have to; dividing by the text's bytes rather than its token count measures compression alone.

A worked example: a mean loss of 2.0 nats per token, on text where a token stands for 4.24 bytes (a 64K
vocabulary on the tokenizer benchmark's corpus, dev/BENCHMARKS.md), is 2.0 / ln(2) = 2.89 bits per token,
/ 4.24 = 0.68 bits per byte: the model would compress that text to 0.68 / 8 = 8.5% of its UTF-8 size.
"""
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    model: the GPT (or its compiled wrapper); batches: iterator of (inputs, targets);
    steps: at most how many batches to take (fewer when a single-pass loader runs out first);
    token_bytes: int tensor [vocab] of byte lengths.
    Targets of -1 and special tokens (0 bytes) are left out of both sums. Sums over all ranks.
    """
    device = token_bytes.device
    # zeros, not None: a rank whose share of a small split runs out early still joins the all_reduce
    total_nats = torch.zeros((), dtype=torch.float32, device=device)
    total_bytes = torch.zeros((), dtype=torch.long, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        try:
            inputs, targets = next(batch_iter)
        except StopIteration:
            break
        # per-token cross-entropy in nats (natural log), flattened to [B*T]; 0 where the target is -1
        loss = model(inputs, targets, loss_reduction="none").reshape(-1).float()
        targets = targets.reshape(-1)
        valid = targets >= 0
        # clamp: -1 is not an index; those positions are zeroed by the where anyway
        num_bytes = torch.where(valid, token_bytes.to(targets.device)[targets.clamp(min=0)], 0)
        # special tokens (0 bytes) are not text: their loss is left out too, or it would be spread over other tokens' bytes
        total_nats += torch.where(num_bytes > 0, loss, 0.0).sum()
        # both sums stay on the device: no .item() per batch, so the GPU is never made to wait mid-loop
        total_bytes += num_bytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        raise ValueError("evaluate_bpb saw no target bytes: the evaluation data is empty or fully masked; raise --eval-tokens")
    return total_nats.item() / (math.log(2) * total_bytes)  # nats -> bits, then per byte
