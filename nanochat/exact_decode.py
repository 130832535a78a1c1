"""
Batch-independent decode on CPU: the matmuls and attention of a continuous-batching step, computed so a row's
logits are the same bits whether it shares the step with 0 or 15 other rows (kernels: rustbpe/src/decode.rs).

Why not torch: BLAS chooses its kernel and thread split by the number of rows M. On this repo's MKL build
M = 1..3 take one kernel and M = 5..7 split rows unevenly between threads, so a row's last bits depend on its
batch-mates, and over a long greedy reply a near-tie argmax eventually flips. The fix used to be padding
every step to a multiple of 4 rows, which made a lone request ~2x slower. The Rust kernels give each output
one fixed chain of fused multiply-adds instead, and they are faster for a few rows too: each 16-column panel
of a weight matrix is read once for up to 6 rows (MKL's small-M sgemm runs at ~20 GFLOP/s on a 2-core EPYC).
A depth-4 step is ~20 tiny products and 4 attentions of 5-60 us each, where driving every op from Python
(or torch's ~5 us per op) would cost a third of the step, so GPT.decode_step hands the whole step to one
Rust call (rustbpe.DecodeModel, `step` below): the embedding, every block with its RMSNorms, residual adds,
relu^2, rotary, QK-norm and cache writes, and the head. `linear` and `attend` are the same kernels one op at
a time: the pieces a reader (and the tests) can hold against torch.

Weights are repacked once per model state into panels [N / 16, K, 16] (pack_panels); the decode tables of
GPT.decode_step hold the weights as [K, N] views, which are the keys here. The panels may be bfloat16
(`--dtype bfloat16` on a CPU without AMX, see engine.prepare_for_inference): half the bytes per token, with
float32 activations and sums, where torch would emulate bf16 matmuls slowly.
"""
import weakref

import torch
import torch.nn.functional as F

from nanochat.gpt import LOGIT_SOFTCAP

try:
    import rustbpe
    KERNELS = hasattr(rustbpe, "DecodeModel")  # an older build without the one-call step counts as none
except ImportError:  # a build without the extension: the scheduler falls back to padded torch steps
    rustbpe, KERNELS = None, False

PANEL = 16  # columns per packed panel (rustbpe.DECODE_PANEL)
# multiply-adds below which a call runs on the calling thread alone. Waking a pool thread costs tens of
# microseconds (more in a VM, where an idle vCPU is halted), so only big products are split
PARALLEL_MIN_WORK = 1 << 23


def usable(device, dtype):
    """Whether exact decode runs here: CPU, float32 weights, and the Rust kernels built."""
    return KERNELS and torch.device(device).type == "cpu" and dtype == torch.float32


def threads_for(work):
    return 1 if work < PARALLEL_MIN_WORK else torch.get_num_threads()


def pack_panels(weight, dtype=torch.float32):
    """[K, N] (any strides) -> contiguous [ceil(N / 16), K, 16] in `dtype`; the last panel padded with zero columns."""
    k, n = weight.shape
    padded = -(-n // PANEL) * PANEL
    weight = F.pad(weight, (0, padded - n)) if padded != n else weight
    return weight.reshape(k, padded // PANEL, PANEL).permute(1, 0, 2).to(dtype).contiguous()


class ExactDecode:
    """The decode step's matmuls (gpt.decode_linear's signature) and attention for rows at their own positions."""

    def __init__(self, weight_dtype=torch.float32):
        # bfloat16: the packed copy halves the bytes a step streams (activations and sums stay float32)
        assert weight_dtype in (torch.float32, torch.bfloat16), weight_dtype
        self.weight_dtype = weight_dtype
        self.packed = {}  # id(weight view) -> (a weak reference to the view, its panels, K, N, panels' address)
        self.models = {}  # id(the decode tables' head view) -> (a weak reference to it, rustbpe.DecodeModel, what it reads)

    def panels(self, weight):
        """(panels, K, N, address of the panels) for a [K, N] float32 CPU weight, packed on first use."""
        entry = self.packed.get(id(weight))
        if entry is None or entry[0]() is not weight:
            assert weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2
            panels = pack_panels(weight.detach(), self.weight_dtype)
            key = id(weight)
            # the entry goes when its weight view does (the model's decode tables were rebuilt), so a model
            # that keeps training in this process (RL) holds one packed copy, not one per update
            alive = weakref.ref(weight, lambda _: self.packed.pop(key, None))
            entry = self.packed[key] = (alive, panels, weight.size(0), weight.size(1), panels.data_ptr())
        return entry[1:]

    def linear(self, x, weight, residual=None, normalize=False, relu_squared=False):
        """
        [residual +] f(x) @ weight for x [B, K], weight [K, N], float32 on the CPU, with f = RMSNorm when
        `normalize`; relu_squared: relu(result)^2. The signature of gpt.decode_linear, fused in one call.
        """
        # runs ~20 times per decode step: the checks are the cheap ones that keep the raw pointers in bounds
        _, k, n, address = self.panels(weight)
        rows = x.shape[0]
        if not x.is_contiguous():
            x = x.contiguous()
        assert x.dtype is torch.float32 and x.is_cpu and x.shape[1] == k, f"x {tuple(x.shape)} {x.dtype} for [{k}, {n}]"
        out = torch.empty((rows, n))
        if residual is not None:
            assert residual.dtype is torch.float32 and residual.is_cpu and residual.shape == out.shape
            residual = residual.contiguous()
        rustbpe.decode_matmul(x.data_ptr(), rows, k, address, self.weight_dtype is torch.bfloat16, n, out.data_ptr(),
                              0 if residual is None else residual.data_ptr(), normalize, relu_squared,
                              threads_for(rows * k * n))
        return out

    def attend(self, layer_keys, layer_values, slots, positions, qkv, heads, rotary=None):
        """
        One decode step's attention, rows at their own positions. qkv [B, (H + 2 Hkv) D]: each row's query, key
        and value heads side by side (the qkv matmul's output); rotary: (cos, sin) tables [T, D] in the
        GPT._decode_tables form, applied with QK-norm to q and k first (None: q and k are used as they are).
        layer_keys/values: one layer's [slots, Hkv, capacity, D] (views of one contiguous cache tensor).
        Writes row r's key and value at positions[r] of slots[r]; returns [B, H, D], each row attending
        over positions 0..positions[r] of its slot.
        """
        num_slots, kv_heads, capacity, dim = layer_keys.shape
        rows = qkv.shape[0]
        assert qkv.dtype is torch.float32 and qkv.is_cpu and qkv.stride(1) == 1
        assert qkv.shape[1] == (heads + 2 * kv_heads) * dim, f"qkv {tuple(qkv.shape)} for {heads}+2x{kv_heads} heads of {dim}"
        assert layer_keys.is_contiguous() and layer_values.is_contiguous() and layer_keys.dtype == torch.float32
        assert layer_values.data_ptr() > layer_keys.data_ptr() and layer_values.shape == layer_keys.shape
        assert len(slots) == len(positions) == rows and all(0 <= s < num_slots for s in slots)
        tables = None
        if rotary is not None:
            cos, sin = rotary
            assert cos.is_contiguous() and sin.is_contiguous() and cos.dtype is torch.float32 and sin.shape == cos.shape
            assert cos.shape[1] == dim
            tables = (cos.data_ptr(), sin.data_ptr(), cos.shape[0])
        out = torch.empty(rows, heads, dim)
        value_offset = (layer_values.data_ptr() - layer_keys.data_ptr()) // layer_keys.element_size()
        rustbpe.decode_attention(qkv.data_ptr(), qkv.stride(0), tables, out.data_ptr(), layer_keys.data_ptr(),
                                 value_offset, capacity, slots, positions, heads, kv_heads, dim,
                                 threads_for(2 * heads * dim * (sum(positions) + rows)))
        return out

    def model(self, tables):
        """
        The rustbpe.DecodeModel of GPT._decode_tables' `tables`, built on first use: the addresses of the packed
        weights and tables, with the tensors behind them kept alive as long as the entry (the weights may be
        swapped or trained; the entry goes when the tables are rebuilt, as the head view is then released).
        Returns (model, (n_layer, n_kv_head, head_dim) of the cache it takes, vocab).
        """
        layers, head, embedding, cos, sin = tables
        entry = self.models.get(id(head))
        if entry is None or entry[0]() is not head:
            (width, vocab), dim = head.shape, cos.shape[1]
            qkv_shape, out_shape, fc_shape, proj_shape = (w.shape for w in layers[0][:4])
            heads, kv_heads = out_shape[0] // dim, (qkv_shape[1] - out_shape[0]) // (2 * dim)
            # the kernel trusts these sizes to walk raw memory: every tensor is checked against them once, here
            assert embedding.is_contiguous() and embedding.dtype is torch.float32 and embedding.shape == (vocab, width)
            assert cos.is_contiguous() and sin.is_contiguous() and cos.dtype is torch.float32 and sin.shape == cos.shape
            assert qkv_shape == (width, (heads + 2 * kv_heads) * dim) and out_shape == (heads * dim, width)
            assert proj_shape == fc_shape[::-1] and fc_shape[0] == width
            kept = [embedding.detach(), cos, sin]  # detached views hold the storage even if a parameter's .data is swapped
            blocks = []
            for index, (w_qkv, w_o, w_fc, w_proj, layer_idx, value_embed, lambdas) in enumerate(layers):
                assert layer_idx == index, "decode tables out of layer order"
                assert (w_qkv.shape, w_o.shape, w_fc.shape, w_proj.shape) == (qkv_shape, out_shape, fc_shape, proj_shape)
                panels = [self.panels(w)[0] for w in (w_qkv, w_o, w_fc, w_proj)]
                if value_embed is not None:
                    value_embed = value_embed.detach()
                    assert value_embed.is_contiguous() and value_embed.dtype is torch.float32
                    assert value_embed.shape == (vocab, kv_heads * dim)
                    kept.append(value_embed)
                kept += panels
                blocks.append((*(p.data_ptr() for p in panels), 0 if value_embed is None else value_embed.data_ptr(), lambdas))
            head_panels = self.panels(head)[0]
            kept.append(head_panels)
            model = rustbpe.DecodeModel(blocks, embedding.data_ptr(), head_panels.data_ptr(), vocab, width, fc_shape[1],
                                        heads, kv_heads, dim, (cos.data_ptr(), sin.data_ptr(), cos.shape[0]),
                                        self.weight_dtype is torch.bfloat16, LOGIT_SOFTCAP)
            key = id(head)
            alive = weakref.ref(head, lambda _: self.models.pop(key, None))
            entry = self.models[key] = (alive, model, kept, (len(layers), kv_heads, dim), vocab)
        _, model, _, cache_sizes, vocab = entry
        return model, cache_sizes, vocab

    def step(self, tables, tokens, cache, slots, positions):
        """
        A whole decode step: tokens [B] (row r's token at positions[r] of slot slots[r]) -> logits [B, V],
        soft-capped as GPT's (in the kernel: a tanh within ~2e-7 of torch's, where torch's took ~4 ns a value here).
        cache: float32 [n_layer, 2, slots, n_kv_head, capacity, head_dim], contiguous; each row's key and value
        are written at its position, then each row attends over positions 0..positions[r] of its slot.
        """
        model, (num_layers, kv_heads, dim), vocab = self.model(tables)
        # the kernel walks the cache by these sizes: checked here, as a wrong one would read past the tensor
        assert cache.is_contiguous() and cache.dtype is torch.float32 and cache.is_cpu, "the decode cache must be float32 on CPU"
        sizes = (cache.size(0), cache.size(1), cache.size(3), cache.size(5)) if cache.dim() == 6 else None
        assert sizes == (num_layers, 2, kv_heads, dim), \
            f"cache {tuple(cache.shape)} for {num_layers} layers of {kv_heads} kv heads of {dim}"
        logits = torch.empty(len(slots), vocab)
        model.step(tokens.tolist(), slots, positions, cache.data_ptr(), cache.size(2), cache.size(4), logits.data_ptr(),
                   torch.get_num_threads(), PARALLEL_MIN_WORK)
        return logits
