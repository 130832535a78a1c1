"""
The GPT model: a small modern decoder-only Transformer.

GPT-2's skeleton (token embedding, a stack of pre-norm attention + MLP blocks on a residual stream,
a linear head), with the changes that later work found to train faster or more stably at equal compute:

- Rotary position embeddings (RoPE, Su et al. 2021, RoFormer) instead of a learned position table:
  q and k are rotated by an angle proportional to their position, so q.k depends only on the
  *relative* distance. Nothing to learn, and the tables can be extended past the training length.
- QK-norm (Henry et al. 2020; Dehghani et al. 2023, ViT-22B): q and k are RMS-normalised per head
  before the dot product. With rms 1 each, |q.k| <= head_dim, so after SDPA's 1/sqrt(head_dim) an
  attention logit is at most sqrt(128) ~ 11: the growth of attention logits that makes large runs
  diverge cannot happen.
- RMSNorm (Zhang & Sennrich 2019) without a learned gain, before every attention and MLP, on the
  token embedding and before the head. Pre-norm keeps the residual stream an untouched sum, so
  gradients reach the first layers directly.
- ReLU^2 MLP activation (So et al. 2021, Primer), 4x wide: found by Primer's architecture search to
  train faster than GELU at equal compute, and cheaper to compute than a gated MLP.
- No biases anywhere (PaLM, Chowdhery et al. 2022, reports better stability at scale without them).
- Untied token embedding and output head: reading a token in and scoring it out are different jobs,
  and untied they can also get very different learning rates (0.2 vs 0.004 by default).
- Logits soft-capped with 15 * tanh(logits / 15) (as in Gemma 2, for stability): the head cannot
  push a logit past 15 however confident it gets.
- Output projections of every block, and the head, start at zero: every block starts as the
  identity on the residual stream, and the first loss is exactly ln(vocab_size) (uniform logits).
- Grouped-query attention (GQA, Ainslie et al. 2023) through n_kv_head: several query heads share
  one key/value head, shrinking the KV cache at inference. n_kv_head == n_head (the default) is plain
  multi-head attention.

One dial sets the size: see model_config_from_depth(). The rest of the file is speed: hand-written
backwards for the CPU (autograd's generic ones make several extra passes over big activations) and a
lean one-token decode path for the engine; each computes the same maths as the plain path it replaces.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import get_dist_info

HEAD_DIM = 128  # every model uses 128-wide heads; width is rounded up to a multiple of it
LOGIT_SOFTCAP = 15.0  # logits live in (-15, 15): a token's probability can go as low as ~e^-30 of the top one


@dataclass
class GPTConfig:
    # the defaults are the depth-20 model; scripts build configs with model_config_from_depth instead
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10  # number of query heads
    n_kv_head: int = 10  # number of key/value heads (GQA when smaller than n_head)
    n_embd: int = 1280
    # speedrun tricks, each kept only if an A/B at equal compute lowers val bpb (dev/BENCHMARKS.md)
    x0_mixing: bool = False  # each block's input is a*x + b*x0 (x0 = the normalised token embedding), a, b learned per layer
    value_embeds: bool = False  # every other layer (the last included) adds a per-token embedding to its attention values


def model_config_from_depth(depth, vocab_size, sequence_len, n_kv_head=None):
    """
    The single size dial: width = depth * 64, rounded UP to a multiple of the 128 head dim,
    heads = width / 128. Tiny CPU depths therefore get at least one full 128-wide head
    (depth 1-2 -> width 128, depth 3-4 -> 256), which keeps head_dim the same at every scale.
    """
    if depth < 1:
        raise ValueError(f"--depth must be at least 1 (got {depth})")
    # aspect ratio 64 (width / depth): depth and width grow together, so model sizes differ along one axis
    n_embd = math.ceil(depth * 64 / HEAD_DIM) * HEAD_DIM
    n_head = n_embd // HEAD_DIM
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if n_kv_head < 1 or n_head % n_kv_head != 0:
        raise ValueError(f"n_kv_head={n_kv_head} must divide the number of heads ({n_head} at depth {depth})")
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)


def has_value_embed(layer_idx, n_layer):
    """Every other layer, counted back from the last (which always has one)."""
    return layer_idx % 2 == (n_layer - 1) % 2


class RMSNorm(torch.autograd.Function):
    """
    Parameter-free RMSNorm with a hand-written backward: y = x / rms(x). The same maths as
    F.rms_norm, but autograd through its composite form costs ~15 passes over x per call on CPU
    (18 calls per step at depth 4); this is 2 passes forward and 4 backward.
    """

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
    """
    Rotary embedding: rotate the two halves of each head as complex pairs by position-dependent
    angles. The backward is the inverse rotation, written out (cheaper than autograd through cat/mul).
    x: [B, T, H, D]; cos/sin: [1, T, 1, D/2].
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_y):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_y, cos, -sin), None, None


def _rotate(x, cos, sin):
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep bf16 activations bf16 under autocast (no-op in fp32)
    d = x.size(3) // 2
    # channel i is paired with channel i + D/2 (the "rotate half" layout, not interleaved pairs): each
    # pair is a 2-D vector turned by angle position * inv_freq[i], i.e. (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([torch.addcmul(x1 * cos, x2, sin), torch.addcmul(x2 * cos, x1, sin, value=-1)], dim=3)


class ReluSquared(torch.autograd.Function):
    """relu(x)^2 with its backward written out (2 passes instead of autograd's 4 over the 4x-wide MLP activations)."""

    @staticmethod
    def forward(ctx, x):
        relu = torch.relu(x)
        ctx.save_for_backward(relu)
        return relu * relu

    @staticmethod
    def backward(ctx, grad_y):
        (relu,) = ctx.saved_tensors
        return grad_y * relu * 2


def norm(x):
    # parameter-free: nothing to learn, nothing to decay. Without autograd (inference, eval) the
    # fused built-in is cheaper per call, which matters for one-token decode steps.
    if x.requires_grad and torch.is_grad_enabled():
        return RMSNorm.apply(x)
    return F.rms_norm(x, (x.size(-1),))


def decode_norm(x):
    # F.rms_norm's composite kernel makes dtype round trips; for fp32 these 4 ops give the same bits and
    # make a one-token decode step at depth 4 ~3% faster (~45 us of ~1.5 ms, 14 norms per step)
    if x.dtype != torch.float32:
        return norm(x)
    return x * torch.rsqrt(torch.mean(x * x, -1, keepdim=True) + torch.finfo(torch.float32).eps)


def decode_linear(x, weight, residual=None, normalize=False, relu_squared=False):
    """Every matmul of a decode step: [residual +] [RMSNorm](x) @ weight, then optionally relu(.)^2."""
    if normalize:
        x = decode_norm(x)
    out = torch.mm(x, weight) if residual is None else torch.addmm(residual, x, weight)  # addmm: the add is free
    return torch.relu_(out).square_() if relu_squared else out


def apply_rotary_emb(x, cos, sin):
    if x.requires_grad and torch.is_grad_enabled():
        return Rotary.apply(x, cos, sin)
    return _rotate(x, cos, sin)


class SoftcapCrossEntropy(torch.autograd.Function):
    """
    Mean cross-entropy of soft-capped logits, computed a chunk of rows at a time, with the gradients
    of x and the head weight worked out in the same pass (so forward does the head's backward too).
    Why: on CPU the [tokens, vocab] logits are the largest tensors of the step, and the plain path
    streams several of them through memory (logits, tanh, softmax, their grads). Chunks stay in cache
    and are updated in place: the loss head gets ~2x faster and the step ~25% faster. On CUDA,
    torch.compile fuses the plain path instead, so this is used on CPU only.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, compute_dtype=torch.float32, reduction="mean", chunk_rows=256):
        # matmuls in compute_dtype (bf16 on AMX CPUs), softmax and both gradients accumulated in fp32;
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
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None, None


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache, value_embed=None):
        B, T, C = x.size()
        if T > 1:
            # one matmul for q, k and v (~5% faster CPU steps); the weights stay separate matrices,
            # so Muon still orthogonalises each on its own
            qkv = F.linear(x, torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight]))
            q, k, v = qkv.split([self.c_q.out_features, self.c_k.out_features, self.c_v.out_features], dim=-1)
        else:  # one-token decode: copying the weights together would cost more than the three matvecs
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if value_embed is not None:
            v = v + value_embed.to(v.dtype).view(B, T, self.n_kv_head, self.head_dim)
        # QK-norm; rotating first or norming first gives the same result (a rotation keeps the rms)
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        t_query, t_key = q.size(2), k.size(2)
        # GQA: enable_gqa has SDPA share each kv head among n_head / n_kv_head query heads (no repeat here)
        gqa = self.n_head != self.n_kv_head
        if t_query == t_key:
            # training, or a prefill into an empty cache: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif t_query == 1:
            # single-token decode: the new query may look at everything cached
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
        else:
            # a chunk after a cached prefix: all of the prefix, then causal within the chunk
            prefix = t_key - t_query
            mask = torch.ones(t_query, t_key, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        h = self.c_fc(x)
        h = ReluSquared.apply(h) if h.requires_grad and torch.is_grad_enabled() else F.relu(h).square()
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, value_embed=None):
        # pre-norm: each branch reads a normalised copy and adds its output back to the raw stream
        x = x + self.attn(norm(x), cos, sin, kv_cache, value_embed)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.x0_mixing:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        # value embeddings (ResFormer, https://arxiv.org/abs/2410.17897): a cheap lookup that gives attention a
        # direct path to token identity; keyed by layer index
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim) for i in range(config.n_layer)
                                           if config.value_embeds and has_value_embed(i, config.n_layer)})
        # rotary tables cover 10x the training length so the engine can generate past it;
        # non-persistent: they are recomputed, never stored in checkpoints
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # the dtype of the CPU decode kernels' packed weight copy (nanochat/exact_decode.py); engine.prepare_for_inference
        # sets bf16 for `--dtype bfloat16` on CPUs without AMX. Not a parameter: never saved
        self.decode_weight_dtype = torch.float32

    def init_weights(self):
        """Initialise every weight (call after building, or after to_empty() from the meta device)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # fan-in aware, shrunk for wide-output matrices (https://arxiv.org/abs/2310.17813)
                # the spectral condition (Yang, Simon & Bernstein 2023): a matrix's spectral norm should scale
                # as sqrt(fan_out / fan_in). A Gaussian with std 1/sqrt(fan_in) has that when fan_out >= fan_in;
                # the min() shrinks the std of a matrix that narrows (fan_out < fan_in) to match
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                # std 1: the embedding is RMS-normalised right after the lookup anyway
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        for embedding in self.value_embeds.values():
            # small next to the values themselves (rms ~1): the path starts nearly silent and is learned
            nn.init.normal_(embedding.weight, mean=0.0, std=self.config.n_embd ** -0.5)
        if self.config.x0_mixing:
            nn.init.ones_(self.resid_lambdas)  # start as the plain residual stream
            nn.init.zeros_(self.x0_lambdas)
        # zero output projections: each residual branch starts as a no-op, the head starts uniform
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, self.config.n_embd // self.config.n_head,
                                                      device=self.transformer.wte.weight.device)
        self.cos, self.sin = cos, sin

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000, device=None):
        # RoFormer's frequencies: pair i turns at base^(-2i/D) radians per position, from one radian per
        # token (fast, local detail) down to ~1/base (slow, long-range position)
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # [1, T, 1, D/2]

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """FLOPs per token for forward+backward: 6 per non-embedding weight, plus attention's QK^T and AV."""
        # lookups and per-layer scalar gains are not matmuls
        nparams_embedding = sum(p.numel() for p in self.embedding_parameters() + self.scalar_parameters())
        cfg = self.config
        head_dim = cfg.n_embd // cfg.n_head
        # 6 = 2 FLOPs per multiply-add x 3 (forward, and backward's two matmuls per weight). Attention's
        # QK^T and AV are 2 matmuls with no weights, 2 * 2 * 3 = 12 FLOPs per (layer, channel, position
        # attended); counted over the full sequence_len, as in the PaLM paper's MFU accounting
        attention = 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.sequence_len
        return 6 * (self.num_params() - nparams_embedding) + attention

    def embedding_parameters(self):
        return list(self.transformer.wte.parameters()) + list(self.value_embeds.parameters())

    def scalar_parameters(self):
        return [self.resid_lambdas, self.x0_lambdas] if self.config.x0_mixing else []

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, compute_dtype=None,
                         scalar_lr=0.05):
        """
        Muon for the 2-D matrices inside the blocks, AdamW for the embedding and the head.
        AdamW learning rates are tuned at width 768 and scaled by (width/768)^-0.5.
        compute_dtype: the training's matmul dtype, also used for Muon's Newton-Schulz (None: bf16 on GPU, else fp32).
        Returns [adamw, muon]; both carry "initial_lr" in each param group for the lr schedule.
        """
        from nanochat.optim import make_adamw, make_muon
        matrix_params = list(self.transformer.h.parameters())
        embedding_params = self.embedding_parameters()
        head_params = list(self.lm_head.parameters())
        scalar_params = self.scalar_parameters()
        assert len(matrix_params) + len(embedding_params) + len(head_params) + len(scalar_params) == len(list(self.parameters()))
        width_scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=head_params, lr=unembedding_lr * width_scale),
            dict(params=embedding_params, lr=embedding_lr * width_scale),
        ]
        if scalar_params:
            # the residual gain moves slowly (it rescales everything after it), the x0 gain freely
            adam_groups += [dict(params=[self.resid_lambdas], lr=scalar_lr * 0.1), dict(params=[self.x0_lambdas], lr=scalar_lr)]
        is_distributed = get_dist_info()[0]
        adamw = make_adamw(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay,
                           distributed=is_distributed)
        muon = make_muon(matrix_params, lr=matrix_lr, momentum=0.95, distributed=is_distributed, ns_dtype=compute_dtype)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """
        idx: [B, T] token ids. With targets ([B, T], -1 = ignore) returns the loss
        (a scalar for "mean"/"sum", [B, T] for "none"); without, returns fp32 logits [B, T, V].
        """
        B, T = idx.size()
        decoding = T == 1 and kv_cache is not None and not torch.is_grad_enabled()
        if decoding and not torch.is_autocast_enabled(idx.device.type):  # autocast keeps the general path
            return self.decode_step(idx, kv_cache).unsqueeze(1)  # lean one-token path: ~1.4x decode tok/s on CPU
        pos = 0 if kv_cache is None else kv_cache.get_pos()
        if pos + T > self.cos.size(1):
            raise ValueError(f"sequence of {pos + T} tokens exceeds the rotary table ({self.cos.size(1)})")
        cos, sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        x = x0 = norm(self.transformer.wte(idx))
        for i, block in enumerate(self.transformer.h):
            if self.config.x0_mixing:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            value_embed = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, kv_cache, value_embed)
        x = norm(x)
        if targets is not None and loss_reduction in ("mean", "sum") and x.device.type == "cpu" and torch.is_grad_enabled():
            compute_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
            return SoftcapCrossEntropy.apply(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), compute_dtype,
                                             loss_reduction)
        logits = self.lm_head(x).float()
        # soft-cap keeps logits in [-15, 15]: stabilises training at no quality cost
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        if loss_reduction == "none":
            loss = loss.view(B, T)
        return loss

    def _decode_tables(self, kv_cache):
        """
        Inference-only tensors for decode_step: per layer (q|k|v weight concatenated, then the other
        weights pre-transposed, layer index), the head, and full-width rotary tables. Built once per
        model state (keyed on each weight's storage and in-place version counter, so training, loading
        or casting rebuilds them) and checked once per KV cache, not per token: keys cached with other
        weights would be stale anyway. Checking per token cost ~30 us of a ~1.4 ms step.
        """
        tables = getattr(kv_cache, "decode_tables", None)  # any cache object with insert_kv/get_pos works
        if tables is not None and tables[0] is self:
            return tables[1]
        blocks, cfg = self.transformer.h, self.config
        weights = [w for block in blocks for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight,
                                                   block.attn.c_proj.weight, block.mlp.c_fc.weight, block.mlp.c_proj.weight)]
        weights += [self.lm_head.weight, self.transformer.wte.weight, self.cos, self.sin]
        weights += self.scalar_parameters() + [e.weight for e in self.value_embeds.values()]
        key = tuple((id(w), w.data_ptr(), w._version) for w in weights)
        cached = getattr(self, "_decode_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                layers = [(torch.cat([b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight]).t(),
                           b.attn.c_proj.weight.t(), b.mlp.c_fc.weight.t(), b.mlp.c_proj.weight.t(), b.attn.layer_idx,
                           self.value_embeds[str(i)].weight if str(i) in self.value_embeds else None,
                           (self.resid_lambdas[i].item(), self.x0_lambdas[i].item()) if cfg.x0_mixing else None)
                          for i, b in enumerate(blocks)]
                cos, sin = self.cos[0, :, 0], self.sin[0, :, 0]  # [T, D/2]
                # rotate-half as one multiply-add: x * [cos, cos] + swap_halves(x) * [sin, -sin] (bit-identical)
                dtype = self.lm_head.weight.dtype
                cos2, sin2 = torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([sin, -sin], dim=-1).to(dtype)
            cached = (key, (layers, self.lm_head.weight.t(), self.transformer.wte.weight, cos2, sin2))
            self._decode_cache = cached
        kv_cache.decode_tables = (self, cached[1])
        return cached[1]

    def decode_step(self, idx, kv_cache):
        """
        One-token decode (inference only): idx [B, 1] -> fp32 logits [B, V], same maths as forward().
        Why: at depth 4 a decode step is ~400 tiny ops, so per-op and Python overhead dominate; this works on
        2-D [B, C] rows, does q|k|v as one matmul, rotary+norm for q and k together, no transposes, adds the
        residuals inside addmm, and skips module attribute lookups.
        A cache may bring `kernels` (nanochat/exact_decode.py, CPU float32): then the whole step is one Rust call
        on the rows the cache names (kernel_rows), ~4x this loop's speed at depth 4 on CPU.
        """
        tables = self._decode_tables(kv_cache)
        layers, head, wte, cos2, sin2 = tables
        B = idx.size(0)
        kernels = getattr(kv_cache, "kernels", None)  # the exact CPU kernels (nanochat/exact_decode.py), or None: torch
        if kernels is not None:  # the whole step in one Rust call, the same maths as the loop below
            return kernels.step(tables, idx.view(B), *kv_cache.kernel_rows(wte))  # refuses positions past the rotary table
        pos = kv_cache.get_pos()
        cfg = self.config
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        if not torch.is_tensor(pos) and pos + 1 > cos2.size(0):
            raise ValueError(f"sequence of {pos + 1} tokens exceeds the rotary table ({cos2.size(0)})")
        # a tensor pos: continuous batching, each row at its own position (checked by its owner) -> [B, 1, D]
        rotary = (cos2[pos].unsqueeze(1), sin2[pos].unsqueeze(1)) if torch.is_tensor(pos) else (cos2[pos], sin2[pos])
        x = x0 = decode_norm(F.embedding(idx.view(B), wte))
        for w_qkv, w_o, w_fc, w_proj, layer_idx, value_embed, lambdas in layers:
            if lambdas is not None:
                x = lambdas[0] * x + lambdas[1] * x0
            qkv = decode_linear(x, w_qkv, normalize=True)
            if value_embed is not None:
                qkv[:, (H + Hkv) * D:] += F.embedding(idx.view(B), value_embed).to(qkv.dtype)
            y = self._decode_attention(qkv, rotary, kv_cache, layer_idx, H, Hkv, D)
            x = decode_linear(y, w_o, residual=x)
            x = decode_linear(decode_linear(x, w_fc, normalize=True, relu_squared=True), w_proj, residual=x)
        logits = decode_linear(x, head, normalize=True)
        if logits.dtype != torch.float32:
            logits = logits.float()
        return logits.div_(LOGIT_SOFTCAP).tanh_().mul_(LOGIT_SOFTCAP)

    @staticmethod
    def _decode_attention(qkv, rotary, kv_cache, layer_idx, H, Hkv, D):
        """qkv [B, (H + 2 Hkv) D] of the new token -> attention output [B, H D]; stores its k, v in the cache."""
        B = qkv.size(0)
        cos, sin = rotary
        qk = qkv[:, :(H + Hkv) * D].view(B, H + Hkv, D)  # q and k heads side by side: one rotary, one norm
        swapped = qk.view(B, H + Hkv, 2, D // 2).flip(2).view(B, H + Hkv, D)
        qk = decode_norm(torch.addcmul(qk * cos, swapped, sin))
        q, k, v = qk[:, :H].unsqueeze(2), qk[:, H:].unsqueeze(2), qkv[:, (H + Hkv) * D:].view(B, Hkv, 1, D)
        if hasattr(kv_cache, "attend"):  # rows of different lengths (nanochat/scheduler.py): the cache attends row by row
            return kv_cache.attend(layer_idx, q, k, v).view(B, H * D)
        keys, values = kv_cache.insert_kv(layer_idx, k, v)
        y = F.scaled_dot_product_attention(q, keys, values, enable_gqa=H != Hkv)  # [B, H, 1, D]
        return y.view(B, H * D)

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive sampling (re-runs the whole sequence each step, no cache): the reference the engine is tested against."""
        assert isinstance(tokens, list)
        device = self.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
            yield next_id.item()
