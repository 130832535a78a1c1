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

One dial sets the size: see model_config_from_depth(). There is one forward pass, used by training,
by prefill and by cached decode (a KV cache argument: nanochat/engine.py). Faster versions of the same
maths for one device live in their own modules and are chosen by the caller, never by the model:
nanochat/cpu_autograd.py (hand-written backwards for CPU training, plugged in through `Ops`) and
nanochat/cpu_decode.py (the whole decode step in one Rust call, used by the engine). Delete them and
everything still trains, evaluates and chats, only slower on a CPU.
"""
import math
from dataclasses import dataclass
from typing import Callable

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


def norm(x):
    # parameter-free: nothing to learn, nothing to decay
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    """x [B, T, H, D] rotated by its positions' angles; cos/sin [1 or B, T, 1, D/2]."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep bf16 activations bf16 under autocast (no-op in fp32)
    d = x.size(3) // 2
    # channel i is paired with channel i + D/2 (the "rotate half" layout, not interleaved pairs): each
    # pair is a 2-D vector turned by angle position * inv_freq[i], i.e. (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([torch.addcmul(x1 * cos, x2, sin), torch.addcmul(x2 * cos, x1, sin, value=-1)], dim=3)


def relu_squared(x):
    return F.relu(x).square()


def softcap_cross_entropy(x, head_weight, targets, reduction="mean"):
    """The loss of normalised final activations x [N, C] against targets [N] (-1 = ignore), through the head."""
    logits = softcap(F.linear(x, head_weight).float())
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


def softcap(logits):
    # Gemma 2's cap: the head cannot push a logit past 15 however confident it gets, which steadies training
    return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)


@dataclass(frozen=True)
class Ops:
    """
    The four operations a faster implementation for one device may replace with its own version of the same
    maths: GPT.forward calls them through model.ops. Training on CPU swaps in nanochat/cpu_autograd.py's
    (hand-written backwards); everything else uses these plain ones, which torch.compile fuses on a GPU.
    """
    norm: Callable = norm
    rotary: Callable = apply_rotary_emb
    relu_squared: Callable = relu_squared
    loss: Callable = softcap_cross_entropy


PLAIN_OPS = Ops()


class CausalSelfAttention(nn.Module):
    """
    Multi-head attention where each token sees itself and the tokens before it. Queries, keys and values are
    three projections of the normalised residual stream; with GQA (n_kv_head < n_head) several query heads
    read the same key/value head, which is what a KV cache stores, so the cache shrinks by n_head / n_kv_head.
    """

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

    def forward(self, x, cos, sin, kv_cache, value_embed, ops):
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
        q, k = ops.norm(ops.rotary(q, cos, sin)), ops.norm(ops.rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if kv_cache is None:
            # training: causal attention over the sequence. GQA: enable_gqa has SDPA share each kv head among
            # n_head / n_kv_head query heads (no repeat here)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
        else:
            # inference: the cache stores these keys and values after each row's past ones and attends over them
            y = kv_cache.attend(self.layer_idx, q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    """The position-wise feed-forward: widen 4x, relu^2, project back. Two thirds of a block's weights live here."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x, ops):
        return self.c_proj(ops.relu_squared(self.c_fc(x)))


class Block(nn.Module):
    """One layer: attention (tokens exchange information) then the MLP (each token computes on its own)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, value_embed, ops):
        # pre-norm: each branch reads a normalised copy and adds its output back to the raw stream
        x = x + self.attn(ops.norm(x), cos, sin, kv_cache, value_embed, ops)
        x = x + self.mlp(ops.norm(x), ops)
        return x


class GPT(nn.Module):
    """
    Token embedding -> n_layer blocks on a residual stream -> final norm -> head -> soft-capped logits.
    The residual stream is an untouched running sum: each block reads a normalised copy and adds its output
    back, so at init (zero output projections) the model is the identity plus a uniform head.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.x0_mixing:
            # per-layer gains: block i reads a*x + b*x0, a way back to the token embedding that deep layers can
            # use without the residual stream having to carry it (from the modded-nanogpt speedruns)
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
        # the implementations of norm, rotary, relu^2 and the loss (see Ops): the plain ones unless whoever trains
        # the model swaps in faster ones for its device (use_ops). Not a parameter: never saved
        self.ops = PLAIN_OPS

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
        """Lookup tables (token and value embeddings): trained by AdamW, and left out of the FLOP count."""
        return list(self.transformer.wte.parameters()) + list(self.value_embeds.parameters())

    def scalar_parameters(self):
        """The per-layer gains of x0 mixing (none without it)."""
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
        # Muon orthogonalises each update, which only makes sense for a matrix that maps activations to activations;
        # the embedding (a lookup, one row per token) and the head (read out per token) keep AdamW's per-entry steps
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

    def use_ops(self, ops):
        """Compute norm, rotary, relu^2 and the loss with `ops` (an Ops) from now on: the caller's choice of speed layer."""
        self.ops = ops
        return self

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """
        idx: [B, T] token ids. With targets ([B, T], -1 = ignore) returns the loss (a scalar for "mean"/"sum",
        [B, T] for "none"); without, returns fp32 logits [B, T, V]. With a kv_cache (inference), row b continues
        the sequence the cache holds for it: its tokens sit at the positions after it, and attend to it.
        """
        B, T = idx.size()
        # training sees positions 0..T-1; with a cache each row continues where its slot's sequence left off
        cos, sin = self.rotary_angles(0 if kv_cache is None else kv_cache.start_positions(), T)
        ops = self.ops
        # the embedding is normalised too: with its std-1 init and a learning rate 50x the head's, it would otherwise
        # set the scale of the whole residual stream
        x = x0 = ops.norm(self.transformer.wte(idx))
        for i, block in enumerate(self.transformer.h):
            if self.config.x0_mixing:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            value_embed = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, kv_cache, value_embed, ops)
        x = ops.norm(x)
        if targets is None:
            # logits in fp32 whatever the compute dtype: sampling and the eval losses compare small differences
            return softcap(self.lm_head(x).float())
        # the loss is computed from the final activations and the head together, so a speed layer can do both in one
        # pass without materialising the [B*T, vocab] logits (nanochat/cpu_autograd.py)
        loss = ops.loss(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def rotary_angles(self, start, T):
        """
        cos, sin of the positions start .. start + T - 1: an int start for every row (training, a prefill, rows
        decoding in step) gives [1, T, 1, D/2]; a tensor of one start per row (rows at their own positions, as in
        continuous batching) gives [B, T, 1, D/2].
        """
        last = (start if isinstance(start, int) else int(start.max())) + T
        if last > self.cos.size(1):
            raise ValueError(f"sequence of {last} tokens exceeds the rotary table ({self.cos.size(1)})")
        if isinstance(start, int):
            return self.cos[:, start:last], self.sin[:, start:last]
        positions = start.view(-1, 1) + torch.arange(T, device=start.device)  # [B, T]
        return self.cos[0, positions], self.sin[0, positions]

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive sampling (re-runs the whole sequence each step, no cache): the reference the engine is tested against,
        and all base_train needs for its few sample prompts. Each token costs a forward over everything so far."""
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
