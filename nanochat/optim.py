"""
Optimizers: Muon for the 2-D matrices inside the Transformer blocks, AdamW for everything else.

Muon (Jordan et al. 2024) takes SGD-momentum's update for a weight matrix and replaces it by the
nearest orthogonal matrix: M = U S V^T becomes U V^T, every singular value set to 1. Why: the raw
momentum of a Transformer matrix is dominated by a few directions (its singular values span orders of
magnitude), so a step along it barely moves the rare directions. Orthogonalising gives every direction
of the update the same size; on the NanoGPT speedrun this trained the hidden matrices in fewer steps
than AdamW. An exact SVD is too slow on GPUs, so a few Newton-Schulz iterations (matmuls
only, fine in bf16) approximate it.

One Muon step for a weight matrix W with gradient G (momentum m = 0.95, Nesterov, as muon_update does it):

    M = m * M + (1 - m) * G                      momentum buffer
    U = (1 - m) * G + m * M                      Nesterov look-ahead
    O = NewtonSchulz5(U)                         ~ U V^T of U's SVD: every singular value near 1
    W = W - lr * sqrt(max(1, rows / cols)) * O   same update size per entry for tall and square matrices

Why only the block matrices: Muon is meant for hidden layers, maps from features to features. The
embedding's input is a one-hot token (a row is a lookup, updated only when its token appears) and the
head's output rows are per-token scores; Muon's author found both train better with AdamW, and vectors
or scalars have nothing to orthogonalise. Those train with AdamW at their own learning rates
(GPT.setup_optimizers).

Single process: Muon below and torch.optim.AdamW.
Distributed (ZeRO-1 style, one reduce_scatter + one all_gather per batch of parameters, never an
all-reduce per parameter): DistMuon gives each rank whole matrices to orthogonalise; DistAdamW gives
each rank a contiguous slice of the flattened parameters. Both also run with a single process, which
is how the tests compare them with their single-process twins.
"""
import math

import torch
import torch.distributed as dist

# quintic Newton-Schulz coefficients tuned to push all singular values towards 1 in 5 steps
# (Keller Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024). Each iteration maps a
# singular value s to a*s + b*s^3 + c*s^5; a = 3.4 makes small ones grow fast, at the price of not
# converging exactly to 1 (they end in ~[0.7, 1.2]), which the author found does not hurt.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G, steps=5, dtype=None):
    """
    Approximately replace G = U S V^T by U V^T (singular values land in roughly [0.7, 1.2]).
    G is one matrix [rows, cols] or a stack of same-shape matrices [n, rows, cols], done in one batch.
    dtype: what the iteration runs in. Default bf16 on GPU, where it is fast and good enough, fp32
    elsewhere; training passes its compute dtype, so CPUs with AMX (bf16 ~5x fp32 there) use bf16 too.
    """
    assert G.ndim in (2, 3)
    a, b, c = NS_COEFFICIENTS
    # Low precision is fine here: the iteration is matmuls only, and its result only has to be roughly
    # orthogonal (singular values ~0.7-1.2), not exact.
    dtype = dtype or (torch.bfloat16 if G.is_cuda else torch.float32)
    X = G.to(dtype)
    X = X.unsqueeze(0) if G.ndim == 2 else X
    transposed = X.size(1) > X.size(2)
    if transposed:
        X = X.mT  # iterate on the wide side: X @ X^T is the smaller square
    # spectral norm <= Frobenius norm, so after this every singular value is <= 1; 1e-7 guards an all-zero matrix
    X = X / (X.norm(dim=(1, 2), keepdim=True) + 1e-7)
    # the polynomial acts on the singular values only (X X^T X = U S^3 V^T): U and V are kept
    for _ in range(steps):
        # A = X X^T is [rows, rows], rows being the smaller side; then X <- a X + (b A + c A^2) X,
        # i.e. a X + b (X X^T) X + c (X X^T)^2 X: the quintic a*s + b*s^3 + c*s^5 on each singular value
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A in one call
        X = torch.baddbmm(X, B, X, beta=a)  # a*X + B@X
    if transposed:
        X = X.mT
    X = X.squeeze(0) if G.ndim == 2 else X
    return X.to(G.dtype)


def muon_update(grad, momentum_buffer, momentum, nesterov=True, ns_steps=5, ns_dtype=None):
    """
    Momentum, then orthogonalise, then scale so tall matrices get the same per-element update size as
    square ones. grad/momentum_buffer: one matrix or a stack of same-shape matrices; grad is overwritten.
    """
    # buf = m * buf + (1 - m) * grad: an exponential moving average of the gradients, in place
    momentum_buffer.lerp_(grad, 1 - momentum)
    # Nesterov: step along (1 - m) * grad + m * buf, a look-ahead by one step of momentum
    update = grad.lerp_(momentum_buffer, momentum) if nesterov else momentum_buffer
    update = zeropower_via_newtonschulz5(update, steps=ns_steps, dtype=ns_dtype)
    # U V^T of a [rows, cols] matrix has rms 1/sqrt(max(rows, cols)) per entry; sqrt(rows / cols) for tall ones
    # brings them to 1/sqrt(cols), the square matrices' value (the MLP's 4x-wide c_fc is tall)
    shape_scale = max(1.0, grad.size(-2) / grad.size(-1)) ** 0.5
    return update * shape_scale


class Muon(torch.optim.Optimizer):
    """
    MomentUm Orthogonalized by Newton-schulz, single process. Only for 2-D parameters.
    Same-shape matrices are stacked and orthogonalised in one batch (a handful of big matmuls
    instead of hundreds of small ones); their momentum lives in one stacked buffer per group.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        # one param group per shape, whatever groups the caller passed: stacking needs same-shape matrices
        super().__init__(_muon_param_groups(params), defaults)
        # not a group setting: a resumed run follows its own --dtype, not the checkpoint's
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        """One update of every matrix: a batched Newton-Schulz per shape group. Gradients are read, not cleared."""
        for group in self.param_groups:
            params = group["params"]
            # [n, rows, cols]; a parameter with no gradient this step (unused) contributes zeros, so the stack
            # keeps its shape and the momentum buffer stays aligned with the parameters
            grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
            state = self.state[params[0]]  # keyed on the group's first matrix: torch's state_dict wants a param key
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grads)
            updates = muon_update(grads, state["momentum_buffer"], group["momentum"], group["nesterov"], group["ns_steps"],
                                  self.ns_dtype)
            # no weight decay here: --weight-decay applies to the AdamW groups only.
            # _foreach: one fused call for the whole group instead of a Python loop of n small adds
            torch._foreach_add_(params, list(updates.unbind(0)), alpha=-group["lr"])


class DistMuon(Muon):
    """
    Muon across ranks. Parameters of one shape are taken world_size at a time: one reduce_scatter
    hands rank r the averaged gradient of the r-th matrix, rank r runs momentum + Newton-Schulz on
    it alone (the expensive part is split, not repeated), one all_gather brings every updated
    matrix back to every rank. Momentum buffers live only on the owning rank (one per matrix, not
    per stacked group). Same settings as Muon; only step() differs.
    """

    @torch.no_grad()
    def step(self):
        """Average the gradients over ranks, update the owned matrices, share the results: three phases."""
        rank, world_size = _rank_and_world_size()
        # phase 1: launch every reduce_scatter so communication overlaps
        pending = []
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), world_size):
                # matrix base + r of the group is rank r's to orthogonalise
                chunk = params[base:base + world_size]
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in chunk]
                # pad the last chunk: the collective needs world_size slots, whether or not a matrix fills each
                grads += [torch.zeros_like(grads[0])] * (world_size - len(chunk))
                stacked = torch.stack(grads)
                owned_grad = torch.empty_like(grads[0])
                work = _reduce_scatter_avg(owned_grad, stacked, world_size)
                pending.append((group, chunk, owned_grad, work))
        # phase 2: update the owned matrix, then all_gather the results. Waiting on the reduce_scatters in
        # launch order: while rank r runs Newton-Schulz on one matrix, later reductions are still in flight.
        gathers = []
        for group, chunk, owned_grad, work in pending:
            if work is not None:
                work.wait()
            owner_index = rank
            if owner_index < len(chunk):
                p = chunk[owner_index]
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                update = muon_update(owned_grad, state["momentum_buffer"], group["momentum"],
                                     group["nesterov"], group["ns_steps"], self.ns_dtype)
                p.add_(update, alpha=-group["lr"])
                owned_param = p.detach()
            else:
                owned_param = torch.zeros_like(chunk[0])  # padding slot: nothing to update
            # every rank sends its updated matrix and receives all world_size of them, in rank order
            gathered = torch.empty((world_size, *chunk[0].shape), dtype=chunk[0].dtype, device=chunk[0].device)
            work = _all_gather(gathered, owned_param.contiguous(), world_size)
            gathers.append((chunk, gathered, work))
        # phase 3: every rank's copy of every matrix becomes the owner's updated one (padding slots are dropped)
        for chunk, gathered, work in gathers:
            if work is not None:
                work.wait()
            for i, p in enumerate(chunk):
                p.copy_(gathered[i])


class DistAdamW(torch.optim.Optimizer):
    """
    AdamW across ranks, same maths as torch.optim.AdamW. Each param group is flattened into one
    vector padded to a multiple of world_size; one reduce_scatter gives rank r the averaged
    gradient of slice r, rank r keeps Adam moments for its slice only, one all_gather rebuilds the
    parameters everywhere.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        """The same three phases as DistMuon.step, on flat slices instead of whole matrices."""
        rank, world_size = _rank_and_world_size()
        # phase 1: flatten each group's gradients into one vector and launch its reduce_scatter
        pending = []
        for group in self.param_groups:
            params = group["params"]
            flat_grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            # ceil(numel / world_size): the zero padding makes the vector split into world_size equal slices
            shard_size = -(-flat_grad.numel() // world_size)
            flat_grad = torch.nn.functional.pad(flat_grad, (0, shard_size * world_size - flat_grad.numel()))
            owned_grad = torch.empty(shard_size, dtype=flat_grad.dtype, device=flat_grad.device)
            work = _reduce_scatter_avg(owned_grad, flat_grad, world_size)
            pending.append((group, owned_grad, shard_size, work))
        # phase 2: AdamW on this rank's slice only (its moments exist only here), then launch the all_gather
        gathers = []
        for group, owned_grad, shard_size, work in pending:
            if work is not None:
                work.wait()
            params = group["params"]
            flat_param = torch.cat([p.detach().reshape(-1) for p in params])
            flat_param = torch.nn.functional.pad(flat_param, (0, shard_size * world_size - flat_param.numel()))
            owned_param = flat_param[rank * shard_size:(rank + 1) * shard_size].clone()
            # the group's state is keyed on its first parameter: torch's state_dict machinery wants a param key
            state = self.state[params[0]]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(owned_param)
                state["exp_avg_sq"] = torch.zeros_like(owned_param)
            state["step"] += 1
            step = state["step"].item()
            beta1, beta2 = group["betas"]
            # decoupled weight decay (Loshchilov & Hutter 2019, AdamW): shrink the weights, not the gradient
            owned_param.mul_(1 - group["lr"] * group["weight_decay"])
            # Adam (Kingma & Ba 2015): m = EMA of the gradient, v = EMA of its square, step = lr * m / (sqrt(v) + eps)
            state["exp_avg"].lerp_(owned_grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(owned_grad, owned_grad, value=1 - beta2)
            # both EMAs start at 0, so early on they underestimate; dividing by 1 - beta^step undoes that bias
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
            owned_param.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias_correction1)
            # flat_param is reused as the receive buffer: after the gather it holds every rank's updated slice
            work = _all_gather(flat_param, owned_param, world_size)
            gathers.append((params, flat_param, work))
        # phase 3: wait for each gather and write the full vector back into the parameters
        for params, flat_param, work in gathers:
            if work is not None:
                work.wait()
            # unflatten: each parameter takes back its own stretch of the vector (the padding at the end is dropped)
            offset = 0
            for p in params:
                p.copy_(flat_param[offset:offset + p.numel()].view_as(p))
                offset += p.numel()


def make_adamw(param_groups, betas, eps, weight_decay, distributed):
    """AdamW for the embedding, head and scalars: DistAdamW under torchrun, torch's own otherwise."""
    if distributed:
        return DistAdamW(param_groups, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.AdamW(param_groups, betas=betas, eps=eps, weight_decay=weight_decay)


def make_muon(params, lr, momentum, distributed, ns_dtype=None):
    """Muon for the block matrices: DistMuon under torchrun, Muon otherwise (same settings, same maths)."""
    return (DistMuon if distributed else Muon)(params, lr=lr, momentum=momentum, ns_dtype=ns_dtype)


def _muon_param_groups(params):
    # a vector or a scalar has no orthogonal form: such a parameter belongs to AdamW, and passing one is a bug
    params = list(params)
    for p in params:
        if p.ndim != 2:
            raise ValueError(f"Muon only handles 2-D matrices, got a parameter of shape {tuple(p.shape)}")
    return _group_by_shape(params)


def _group_by_shape(params):
    # one group per shape, in a fixed order, so every rank chunks the same matrices the same way
    shapes = []
    for p in params:
        if p.shape not in shapes:
            shapes.append(p.shape)
    return [dict(params=[p for p in params if p.shape == shape]) for shape in shapes]


def _rank_and_world_size():
    # (0, 1) without a process group: the Dist* optimizers then run alone, which is how the tests compare them
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce_scatter_avg(output, stacked, world_size):
    """
    Start averaging `stacked` over ranks, rank r receiving only slice r (into `output`); returns a handle to
    wait() on, or None when there is nothing to wait for. A ring all-reduce is exactly a reduce_scatter then an
    all_gather; ZeRO-1 puts the optimizer update between the two, so each rank updates (and keeps state for)
    only its slice, for the same traffic as a plain all-reduce of the gradients.
    """
    if world_size == 1:
        output.copy_(stacked.view_as(output))
        return None
    # flat views: gloo wants dim 0 of the input to be world_size x dim 0 of the output.
    # SUM then divide: ReduceOp.AVG is not offered by every backend/version
    work = dist.reduce_scatter_tensor(output.view(-1), stacked.view(-1), op=dist.ReduceOp.SUM, async_op=True)
    return _DivideAfter(work, output, world_size)


def _all_gather(output, owned, world_size):
    """Start gathering every rank's `owned` into `output`, in rank order; a handle to wait() on, or None."""
    if world_size == 1:
        output.view(-1)[:owned.numel()].copy_(owned.reshape(-1))
        return None
    return dist.all_gather_into_tensor(output.view(-1), owned.reshape(-1), async_op=True)


class _DivideAfter:
    """Wait for a reduce_scatter, then turn its sum into a mean."""

    def __init__(self, work, tensor, world_size):
        self.work, self.tensor, self.world_size = work, tensor, world_size

    def wait(self):
        self.work.wait()
        self.tensor.div_(self.world_size)
