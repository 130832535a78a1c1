"""
Faster training on a CPU: the model's norm, rotary, relu^2 and loss with backwards written by hand.

Autograd differentiates a composite op by recording every elementwise step and replaying each backwards,
so a simple formula costs several passes over its activations, and on a CPU, where memory bandwidth and
not arithmetic is the limit, those passes are the step's time. RMSNorm through autograd makes ~15 passes
over x per call (18 calls per step at depth 4); written out it is 2 forward and 4 backward. The largest
tensors of a step are the [tokens, vocab] logits: the loss below never builds them whole, but computes a
chunk of rows at a time, with the gradients of x and of the head in the same pass, while the chunk is in
cache. Together: ~1.36x the plain path's training tok/s on 2 CPU cores (dev/bench_cpu_train.py).

Each function computes the same maths as the plain op in nanochat/gpt.py (tests/test_cpu_autograd.py holds
them to it, values and gradients), and falls back to it where there is nothing to differentiate (eval,
sampling), where the plain ops are cheaper. The training setup plugs them in on a CPU:
`model.use_ops(CPU_TRAINING_OPS)`. On a GPU, torch.compile fuses the plain ops instead.
"""
import torch
import torch.nn.functional as F

from nanochat.gpt import LOGIT_SOFTCAP, Ops, apply_rotary_emb, relu_squared, softcap_cross_entropy


def differentiating(x):
    """Whether autograd will need a backward through x: only then is a hand-written one worth calling."""
    return x.requires_grad and torch.is_grad_enabled()


class RMSNorm(torch.autograd.Function):
    """y = x / rms(x), parameter-free; backward: project the gradient off y, then rescale by 1/rms."""

    @staticmethod
    def forward(ctx, x):
        eps = torch.finfo(x.dtype).eps
        acc_dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in at least fp32 (bf16 under autocast)
        rstd = torch.rsqrt(x.to(acc_dtype).square().mean(-1, keepdim=True) + eps)
        y = (x * rstd).to(x.dtype)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, rstd = ctx.saved_tensors
        # d/dx of x * rstd(x): project out the component along y, then rescale
        dot = (grad_y * y).to(rstd.dtype).mean(-1, keepdim=True)
        return (torch.addcmul(grad_y.to(rstd.dtype), y.to(rstd.dtype), dot, value=-1) * rstd).to(grad_y.dtype)


class Rotary(torch.autograd.Function):
    """The rotary embedding; its backward is the inverse rotation, written out (cheaper than autograd through cat/mul)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return apply_rotary_emb(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_y):
        cos, sin = ctx.saved_tensors
        return apply_rotary_emb(grad_y, cos, -sin), None, None


class ReluSquared(torch.autograd.Function):
    """relu(x)^2 with its backward written out: 2 passes instead of autograd's 4 over the 4x-wide MLP activations."""

    @staticmethod
    def forward(ctx, x):
        relu = torch.relu(x)
        ctx.save_for_backward(relu)
        return relu * relu

    @staticmethod
    def backward(ctx, grad_y):
        (relu,) = ctx.saved_tensors
        return grad_y * relu * 2


class SoftcapCrossEntropy(torch.autograd.Function):
    """
    Cross-entropy of soft-capped logits, a chunk of rows at a time, with the gradients of x and the head weight
    worked out in the same pass (so forward does the head's backward too): the loss head gets ~2x faster and
    the whole step ~25% faster on a CPU, where the plain path streams several [tokens, vocab] tensors through
    memory (logits, tanh, softmax and their gradients).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, compute_dtype=torch.float32, reduction="mean", chunk_rows=256):
        # matmuls in compute_dtype (bf16 on CPUs with AMX or AVX512-BF16), softmax and both gradients accumulated in fp32;
        # explicit casts instead of autocast, which does not apply to the out=/in-place matmuls below
        with torch.autocast("cpu", enabled=False):
            return SoftcapCrossEntropy._forward(ctx, x, weight, targets, compute_dtype, reduction, chunk_rows)

    @staticmethod
    def _forward(ctx, x, weight, targets, compute_dtype, reduction, chunk_rows):
        grad_x, grad_weight = torch.empty_like(x), torch.zeros_like(weight)
        low_precision = not (compute_dtype == x.dtype == weight.dtype == torch.float32)
        weight_c = weight.to(compute_dtype)
        count = (targets != -1).sum().clamp(min=1) if reduction == "mean" else 1  # "sum": the caller normalises
        accumulate_dtype = torch.promote_types(x.dtype, torch.float32)  # softmax in at least fp32
        total = x.new_zeros((), dtype=accumulate_dtype)
        for start in range(0, x.size(0), chunk_rows):
            x_chunk, t_chunk = x[start:start + chunk_rows].to(compute_dtype), targets[start:start + chunk_rows]
            valid = (t_chunk != -1).unsqueeze(1)
            safe_targets = t_chunk.clamp(min=0).unsqueeze(1)
            tanh = torch.mm(x_chunk, weight_c.t()).to(accumulate_dtype).div_(LOGIT_SOFTCAP).tanh_()
            logits = tanh * LOGIT_SOFTCAP
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            total += ((lse - logits.gather(1, safe_targets)) * valid).sum()
            # d loss / d capped logits = softmax - one_hot; chain through the cap: * (1 - tanh^2)
            grad = logits.sub_(lse).exp_()
            grad.scatter_add_(1, safe_targets, -valid.to(grad.dtype))
            grad.mul_(valid)
            grad = tanh.square_().neg_().add_(1).mul_(grad)
            if low_precision:
                grad = grad.to(compute_dtype)
                grad_x[start:start + chunk_rows] = torch.mm(grad, weight_c)
                grad_weight += torch.mm(grad.t(), x_chunk)
            else:
                torch.mm(grad, weight, out=grad_x[start:start + chunk_rows])
                grad_weight.addmm_(grad.t(), x_chunk)
        ctx.save_for_backward(grad_x.div_(count), grad_weight.div_(count))
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        # the gradients were computed in forward; backward only scales them by the loss's incoming gradient
        # (1 when the loss itself is backpropagated, as in train_step)
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None, None


def norm(x):
    """gpt.norm, with RMSNorm's backward written out while training."""
    return RMSNorm.apply(x) if differentiating(x) else F.rms_norm(x, (x.size(-1),))


def rotary(x, cos, sin):
    """gpt.apply_rotary_emb, with its backward (the inverse rotation) written out while training."""
    return Rotary.apply(x, cos, sin) if differentiating(x) else apply_rotary_emb(x, cos, sin)


def relu_squared_op(x):
    """gpt.relu_squared, with its backward written out while training."""
    return ReluSquared.apply(x) if differentiating(x) else relu_squared(x)


def loss(x, head_weight, targets, reduction="mean"):
    """gpt.softcap_cross_entropy, computed in chunks with the gradients while training ("mean" or "sum")."""
    # per-token losses ("none", RL's weighted loss) need the logits anyway: the plain path
    if reduction == "none" or not (differentiating(x) or differentiating(head_weight)):
        return softcap_cross_entropy(x, head_weight, targets, reduction)
    compute_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return SoftcapCrossEntropy.apply(x, head_weight, targets, compute_dtype, reduction)


CPU_TRAINING_OPS = Ops(norm=norm, rotary=rotary, relu_squared=relu_squared_op, loss=loss)
