"""
Batch-invariant decode on CPU: a whole decode step of nanochat.gpt.GPT, for rows at their own positions, in one
call to Rust (the decode_kernels extension, built from decode_kernels/), and a row's logits are the same bits
whether it shares the step with 0 or 15 other rows.

Why batch-invariant. The chat server batches requests continuously: every step feeds one token of each reply
in flight. With torch, BLAS chooses its kernel and its thread split by the number of rows M (on this repo's MKL
build M = 1..3 take one kernel and M = 5..7 split rows unevenly), so a row's last bits depend on its
batch-mates, and over a long greedy reply a near-tie argmax eventually flips: the same prompt gives another
answer when the server is busy. The kernels give every output one fixed chain of fused multiply-adds, the same
for any row count, thread count and CPU path. They are also faster for a few rows: each 16-column panel of a
weight matrix is read once for up to 6 rows, where MKL's small-M sgemm runs at ~20 GFLOP/s on a 2-core EPYC.

Why one call per step. At depth 4 a step is ~20 tiny products and 4 attentions of 5-60 us each; driving each
op from Python (torch's ~5 us per op, plus wrappers and checks) cost a third of the step. So the step is one
Rust call: the embedding, every block with its RMSNorms, residual adds, relu^2, rotary, QK-norm and cache
writes, the head and its softcap, without the GIL.

What is packed once. Each weight matrix is copied into panels [N / 16, K, 16] (pack_panels), in float32 or,
with weight_dtype=bfloat16, in bfloat16: half the bytes a step streams, with float32 activations and sums
(`--dtype bfloat16` on a CPU without AMX, see engine.prepare_for_inference). The embedding, the value
embeddings and the rotary tables are read where the model keeps them. The packed model is rebuilt when a
weight changes: trained in place (RL samples from the model it trains), loaded from a checkpoint, or swapped
by .to(). refresh() compares every weight's address and in-place version counter with the packed ones; the
engine calls it once per reply, at its prefill (weights never change in the middle of a reply), because on
every step it would cost ~4% of a batch-1 step at depth 4 (28 tensors' metadata, just pushed out of the CPU
caches by the kernel's stream of weights: 11-28 us).

Buffers, not addresses. Tensors go to Rust as numpy arrays over their memory; the extension checks each one's
item type, contiguity, writability and shape against the model, and every token, slot and position against
the vocabulary, the cache and the rotary table: a wrong input is a ValueError, never a read past a buffer.
"""
import statistics
import time

import numpy
import torch
import torch.nn.functional as F

from nanochat.gpt import LOGIT_SOFTCAP

try:
    import decode_kernels
except ImportError:  # installed with `uv sync --extra cpu-kernels`; without it callers keep the torch path
    decode_kernels = None

# multiply-adds below which a product or an attention runs on the calling thread alone: waking a pool thread
# costs tens of microseconds (more in a VM, where an idle vCPU is halted), so only big ones are split
PARALLEL_MIN_WORK = 1 << 23


def available():
    """Whether the decode_kernels extension is installed."""
    return decode_kernels is not None


def usable(device, dtype):
    """Whether CPUDecoder runs here: CPU, float32 weights, and the extension installed."""
    return available() and torch.device(device).type == "cpu" and dtype == torch.float32


def pack_panels(weight, dtype=torch.float32):
    """
    An nn.Linear weight [N, K] (y = x @ weight.T) -> the panels of its [K, N] product as a numpy array
    [ceil(N / 16), K, 16], in `dtype` (bfloat16 as its uint16 bits, which numpy can hold); the last panel
    padded with zero columns. Each panel holds the 16 columns one pass of the kernel multiplies, in k order.
    """
    panel = decode_kernels.PANEL
    n, k = weight.shape
    padded = -(-n // panel) * panel
    weight = F.pad(weight.detach(), (0, 0, 0, padded - n))
    panels = weight.view(padded // panel, panel, k).transpose(1, 2).to(dtype).contiguous()
    return (panels.view(torch.uint16) if dtype == torch.bfloat16 else panels).numpy()


def as_buffer(tensor, name):
    """A CPU tensor's memory as a numpy array, no copy: the buffer the extension checks, then reads or writes."""
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError) as error:  # on a GPU, a dtype numpy lacks (bfloat16), a tensor that needs grad
        raise ValueError(f"{name}: {error}") from None


def watched_weights(model):
    """(dict, key) where each tensor a step reads lives: read anew each step, a replaced Parameter is seen too
    (load_state_dict(assign=True)), and a dict lookup costs ~0.1 us where module attribute access costs ~1 us."""
    modules = [module for block in model.transformer.h for module in (block.attn.c_q, block.attn.c_k, block.attn.c_v,
                                                                      block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
    modules += [model.lm_head, model.transformer.wte, *model.value_embeds.values()]
    places = [(module._parameters, "weight") for module in modules]
    places += [(model._buffers, "cos"), (model._buffers, "sin")]
    if model.config.x0_mixing:
        places += [(model._parameters, "resid_lambdas"), (model._parameters, "x0_lambdas")]
    return places


class CPUDecoder:
    """Decode steps of `model` (a nanochat.gpt.GPT with float32 weights on the CPU) in the Rust kernels."""

    def __init__(self, model, weight_dtype=torch.float32):
        if not available():
            raise RuntimeError("the decode_kernels extension is not installed (uv sync --extra cpu-kernels)")
        if weight_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"packed weights are float32 or bfloat16, not {weight_dtype}")
        self.model, self.weight_dtype = model, weight_dtype
        self.places = watched_weights(model)
        self.kernels = None  # the decode_kernels.DecodeModel of the weights as they were at self.packed_state
        self.packed_state = None

    def weights_state(self):
        """Where each weight's memory is and its count of in-place changes: a training step, a load_state_dict or a
        .to() changes one of them."""
        tensors = [place[key] for place, key in self.places]
        return [tensor.data_ptr() for tensor in tensors], [tensor._version for tensor in tensors]

    def refresh(self):
        """Repack the weights if they changed since they were packed (or were never packed)."""
        state = self.weights_state()
        if state != self.packed_state:
            self.pack(state)

    def step(self, tokens, cache, slots, positions):
        """
        tokens: ints or a LongTensor [B]; row r feeds tokens[r] at position positions[r] of slot slots[r]: writes its
        key and value there in `cache` (float32 [n_layer, 2, num_slots, n_kv_head, capacity, head_dim], contiguous)
        and attends over positions 0..positions[r] of that slot. Rows of one slot at consecutive positions (a prompt
        as one step) are causal: every row's key is written before any row attends.
        Returns float32 logits [B, V], soft-capped like GPT.forward's, of the weights as of the last refresh().
        """
        if self.kernels is None:
            self.refresh()
        tokens = tokens.tolist() if torch.is_tensor(tokens) else tokens
        # a torch tensor lent to Rust as a numpy view, not numpy's own array returned through from_numpy: freeing a
        # tensor over numpy memory takes the GIL back inside torch's C++, which aborts a server thread whose step
        # ends while the interpreter is shutting down
        logits = torch.empty(len(tokens), self.vocab)
        self.kernels.step(tokens, slots, positions, as_buffer(cache, "cache"), logits.numpy(), torch.get_num_threads(),
                          PARALLEL_MIN_WORK)
        return logits

    def pack(self, state):
        """Pack the model's weights as they are now (`state`) into a new decode_kernels.DecodeModel."""
        model, config = self.model, self.model.config
        self.kernels = None  # the old packed copy goes first: one copy at a time, even while packing
        if any(place[key].dtype != torch.float32 or place[key].device.type != "cpu" for place, key in self.places):
            raise ValueError("CPUDecoder needs float32 weights on the CPU (see usable())")
        with torch.no_grad():
            blocks = [self.pack_block(i, block) for i, block in enumerate(model.transformer.h)]
            self.vocab, width = model.lm_head.weight.shape
            self.kernels = decode_kernels.DecodeModel(
                embedding=as_buffer(model.transformer.wte.weight.detach(), "wte"), blocks=blocks,
                head=pack_panels(model.lm_head.weight, self.weight_dtype),
                # [1, L, 1, D/2] -> [L, D/2]: a view, contiguous
                cos=as_buffer(model.cos[0, :, 0], "cos"), sin=as_buffer(model.sin[0, :, 0], "sin"),
                vocab=self.vocab, width=width, heads=config.n_head, kv_heads=config.n_kv_head,
                head_dim=config.n_embd // config.n_head, fc_width=model.transformer.h[0].mlp.c_fc.weight.size(0),
                bf16=self.weight_dtype == torch.bfloat16, softcap=LOGIT_SOFTCAP)
        self.packed_state = state

    def pack_block(self, i, block):
        """Block i as DecodeModel takes it: panels of q|k|v, out_proj, fc, proj; value embedding; x0 lambdas."""
        model, attn, mlp = self.model, block.attn, block.mlp
        qkv = torch.cat([attn.c_q.weight, attn.c_k.weight, attn.c_v.weight])  # one product for the three
        panels = [pack_panels(weight, self.weight_dtype) for weight in (qkv, attn.c_proj.weight, mlp.c_fc.weight,
                                                                        mlp.c_proj.weight)]
        value_embed = model.value_embeds[str(i)].weight.detach() if str(i) in model.value_embeds else None
        lambdas = (model.resid_lambdas[i].item(), model.x0_lambdas[i].item()) if model.config.x0_mixing else None
        return (*panels, None if value_embed is None else as_buffer(value_embed, f"value_embeds[{i}]"), lambdas)


def seconds_per_step(step, cache, steps):
    """The median time of `steps` one-row decode steps (after two to warm caches and threads), each one position on."""
    times = []
    for position in range(steps + 2):
        started = time.perf_counter()
        step([1], cache, [0], [position])
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def probe_weight_dtype(model, steps=12):
    """
    Which copy of the weights decodes faster on this CPU at batch 1, the latency a lone chat client feels:
    -> (torch.float32 or torch.bfloat16, {dtype: seconds per step}). bf16 panels halve the bytes a step streams
    (1.1-1.4x at depth 4 on a 2-core EPYC) but cost a widening per weight; which wins depends on the CPU's
    memory bandwidth against its arithmetic, so it is measured, not assumed (~12 steps of each, ~50 ms at depth 4).
    """
    config = model.config
    cache = torch.zeros(config.n_layer, 2, 1, config.n_kv_head, steps + 2, config.n_embd // config.n_head)
    timings = {}
    for weight_dtype in (torch.float32, torch.bfloat16):
        decoder = CPUDecoder(model, weight_dtype)
        timings[weight_dtype] = seconds_per_step(decoder.step, cache, steps)
        del decoder  # one packed copy at a time
    return min(timings, key=timings.get), timings
