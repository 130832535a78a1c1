"""
Inference: a KV cache of slots, one decode step for many rows, sampling, and tool use.

A KV cache keeps every layer's keys and values of the tokens seen so far, so each new token costs one
small forward pass instead of re-running the whole sequence. Ours holds a number of slots, one sequence
each with its own length: Engine.generate fills one slot per sample of a prompt (RL, evals, the CLI),
the chat server (nanochat/batching.py) one per request in flight. Both drive the same three calls:

    prefill   a prompt into a slot (its keys and values), -> the logits of its next token
    step      one token for each of some rows, each at its own slot's length, -> their next logits
    advance   each row takes its next token: forced tool output first, else a sample with its own settings;
              a row that just closed <|python_start|> code <|python_end|> hands its tool call back

When a row writes a tool call, the caller runs it (inline in generate, on a thread pool in the server)
and the engine forces <|output_start|> result <|output_end|> into that row; forced tokens have mask 0.
Calculator calls (arithmetic, string counting) skip the sandbox: nanochat/calculator.py evaluates them
in-process; anything else runs in nanochat/execution.py's sandbox.

The steps run through GPT.forward with the cache, or on a CPU through nanochat/cpu_decode.py when its
Rust extension is built: the whole step in one call, ~4x faster at depth 4, with every row's bits
independent of its batch-mates. The engine picks it; the model knows nothing of it.
"""
import ast
import codecs
import contextlib
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.calculator import NotCalculable, calculate
from nanochat.common import get_compute_dtype
from nanochat.execution import execute_code, sandbox_is_strong

try:  # a speed layer, optional: without it (or without its Rust extension) steps run through GPT.forward
    from nanochat import cpu_decode
except ImportError:
    cpu_decode = None

CACHE_CHUNK = 1024  # the cache grows in steps of this many positions (rarely: the first size is prompt + max_tokens)
MAX_TOOL_OUTPUT_CHARS = 200  # what a tool call can force into the context; a runaway print must not flood it
# On a CPU with the Rust decoder, a prompt this short is prefilled as one decode step whose rows are its tokens
# (causal by construction: every row's key is written before any row attends). Longer ones go through
# GPT.forward, whose attention cost grows as T^2 less steeply. Depth 4, as one step vs the model:
# 64 tokens 13.1 vs 15.5 ms, 128: 23.3 vs 23.9, 192: 35.7 vs 31.7
PREFILL_AS_STEP_MAX = 128


class KVCache:
    """
    Keys and values of every layer for num_slots sequences: one tensor [n_layer, 2, slots, n_kv_head, capacity,
    head_dim] and a length per slot. A step feeds some rows: begin_step names each row's slot (and where it
    starts, by default at the slot's length); GPT.forward reads start_positions() for its rotary angles and calls
    attend() once per layer; end_step moves each slot's length past what the step wrote.
    """

    def __init__(self, num_slots, num_layers, num_kv_heads, head_dim):
        self.num_slots, self.num_layers, self.num_kv_heads, self.head_dim = num_slots, num_layers, num_kv_heads, head_dim
        self.cache, self.capacity = None, 0
        self.lengths = [0] * num_slots
        self.step_slots, self.step_starts, self.padded_rows = [], [], 0

    def reserve(self, positions, dtype, device):
        """Room for `positions` per slot, in dtype on device, keeping what is stored (it grows by CACHE_CHUNK).
        One preallocated tensor, not a list of per-token tensors: a decode step writes into it in place, where
        growing by concatenation would copy the whole cache at every token."""
        if self.cache is not None and positions <= self.capacity:
            return
        capacity = -(-positions // CACHE_CHUNK) * CACHE_CHUNK
        grown = torch.zeros(self.num_layers, 2, self.num_slots, self.num_kv_heads, capacity, self.head_dim, dtype=dtype, device=device)
        if self.cache is not None:
            grown[..., :self.capacity, :] = self.cache
        self.cache, self.capacity = grown, capacity

    def begin_step(self, slots, starts=None, padded_rows=None):
        """The rows of the next forward pass: row r writes into slots[r] from position starts[r] (default: the slot's
        length). padded_rows: the pass carries that many rows in all, the extra ones padding whose output is unused."""
        self.step_slots = list(slots)
        self.step_starts = [self.lengths[slot] for slot in slots] if starts is None else list(starts)
        self.padded_rows = max(padded_rows or 0, len(self.step_slots))

    def start_positions(self):
        """Where each row's tokens start: an int when every row starts at the same position, else a tensor [rows].
        GPT.forward turns it into rotary angles: a slice of the table for an int, a gather for per-row starts."""
        starts = self.step_starts + [0] * (self.padded_rows - len(self.step_starts))  # padding sits at 0: a valid angle
        if len(set(starts)) == 1:
            return starts[0]
        return torch.tensor(starts, device=self.cache.device)

    def attend(self, layer_idx, q, k, v):
        """
        Store this step's keys and values at each row's positions, then attend: q [B, H, T, D], k and v [B, Hkv, T, D]
        (B may include padding rows) -> [B, H, T, D], each row over its slot's positions up to its own tokens.
        """
        rows, T = len(self.step_slots), q.size(2)
        # allocated here on first use, in the keys' dtype: bf16 under autocast on a GPU, whatever the weights are
        self.reserve(max(self.step_starts) + T, k.dtype, k.device)
        keys, values = self.cache[layer_idx, 0], self.cache[layer_idx, 1]
        first, start = self.step_slots[0], self.step_starts[0]
        if self.step_slots == list(range(first, first + rows)) and self.step_starts == [start] * rows:
            # every row at the same position in consecutive slots (Engine.generate): one write, one attention
            keys[first:first + rows, :, start:start + T] = k[:rows]
            values[first:first + rows, :, start:start + T] = v[:rows]
            y = causal_attention(q[:rows], keys[first:first + rows, :, :start + T], values[first:first + rows, :, :start + T], start)
            outputs = [y]
        else:
            # rows at their own positions (the server): each writes and attends alone, over exactly its own keys,
            # so its result does not depend on which other rows share the step
            outputs = []
            for row, (slot, start) in enumerate(zip(self.step_slots, self.step_starts)):
                keys[slot, :, start:start + T] = k[row]
                values[slot, :, start:start + T] = v[row]
                outputs.append(causal_attention(q[row:row + 1], keys[slot:slot + 1, :, :start + T],
                                                values[slot:slot + 1, :, :start + T], start))
        if q.size(0) > rows:
            # padding rows (Engine.step's row_multiple) attend to nothing: zeros, whose logits nobody reads
            outputs.append(q.new_zeros((q.size(0) - rows,) + q.shape[1:]))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def end_step(self, tokens_per_row=1):
        """After the forward pass: each fed slot now holds its keys up to its row's last token. (max: a prompt fed
        as one step has one row per token in the same slot, each one position further.)"""
        for slot, start in zip(self.step_slots, self.step_starts):
            self.lengths[slot] = max(self.lengths[slot], start + tokens_per_row)

    def copy_slot(self, source, targets):
        """Give each target slot the source slot's keys, values and length (a prompt prefilled once, sampled many times)."""
        length = self.lengths[source]
        for target in targets:
            self.cache[:, :, target, :, :length] = self.cache[:, :, source, :, :length]
            self.lengths[target] = length

    def bytes_per_position(self):
        """Cache memory per token position per slot (keys and values of every layer): what /stats reports in use."""
        return 0 if self.cache is None else self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.cache.element_size()


def causal_attention(q, k, v, start):
    """q [B, H, T, D] at positions start .. start+T-1 over k, v [B, Hkv, start+T, D]: all of the past, causal within T."""
    gqa = q.size(1) != k.size(1)  # GQA: SDPA shares each kv head among n_head / n_kv_head query heads
    T = q.size(2)
    if T == 1:  # one new token sees everything before it
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if start == 0:  # a prompt into an empty slot
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # a chunk after a cached prefix: query i (position start + i) sees keys 0 .. start + i
    mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """
    logits [B, V] -> token ids [B, 1]. temperature 0 is greedy; top_k None/0 and top_p None/1 mean no filtering.
    Temperature divides the logits (below 1 sharpens the distribution, above 1 flattens it); top-k keeps the k most
    likely tokens; top-p (nucleus sampling, Holtzman et al. 2019) the fewest whose probabilities add up to p, so the
    cut adapts to how sure the model is. rng: a torch.Generator, so a seed reproduces the samples.
    """
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    vocab_size = logits.size(-1)
    if top_k is not None and 0 < top_k < vocab_size:
        values, indices = torch.topk(logits, top_k, dim=-1)
    else:
        values, indices = logits, None
    probs = F.softmax(values / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, num_samples=1, generator=rng)
        choice = order.gather(-1, choice)
    else:
        choice = torch.multinomial(probs, num_samples=1, generator=rng)
    return choice if indices is None else indices.gather(-1, choice)


REFUSED_TOOL_CODE = ("Error: this server runs only calculator expressions: no sandbox for other code "
                     "(install bubblewrap, or start chat_web with --allow-unsandboxed-code)")


def run_tool_call(code, timeout=2.0, allow_weak_sandbox=True):
    """
    Run one tool call and return the text to force into the context.
    An expression (e.g. `12*7` or `"strawberry".count("r")`) gives its value; statements give what they print.
    Calculator expressions are evaluated in-process (microseconds); anything else goes to the sandbox,
    unless the host has only the weak one and `allow_weak_sandbox` is False (a server open to the network).
    Errors and timeouts give a short "Error: ..." so the model sees something and the row never stalls.
    """
    code = code.strip()
    try:
        return calculate(code)[:MAX_TOOL_OUTPUT_CHARS]
    except NotCalculable:
        pass
    except (ArithmeticError, ValueError, TypeError, IndexError, KeyError, MemoryError) as e:
        return f"Error: {type(e).__name__}: {e}"[:MAX_TOOL_OUTPUT_CHARS]
    if not allow_weak_sandbox and not sandbox_is_strong():
        return REFUSED_TOOL_CODE
    try:
        program = tool_program(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        # code that does not even parse never reaches the sandbox: the parser's own message, in microseconds.
        # RecursionError/MemoryError: CPython's parser gives up on code nested a few thousand deep (`----...1`)
        reason = e.msg if isinstance(e, SyntaxError) else "code nested too deeply" if not isinstance(e, ValueError) else str(e)
        return f"Error: {type(e).__name__}: {reason}"[:MAX_TOOL_OUTPUT_CHARS]
    result = execute_code(program, timeout=timeout, maximum_memory_bytes=256 * 1024 * 1024,
                          max_output_bytes=4 * MAX_TOOL_OUTPUT_CHARS)
    if result.success:
        text = result.stdout.strip()
    else:
        text = f"Error: {result.error}"
    return text[:MAX_TOOL_OUTPUT_CHARS]


def tool_program(code):
    """The program the sandbox runs for a tool call: an expression prints its value, statements run as they are.
    Raises what the parser raises for code that is neither (SyntaxError, or RecursionError when nested too deep)."""
    try:
        ast.parse(code, mode="eval")
        return f"print(eval(compile({code!r}, '<tool>', 'eval')))"
    except SyntaxError:
        ast.parse(code, mode="exec")
        return code


def prepare_for_inference(model, dtype="auto", decoder="auto"):
    """
    Choose how a model decodes here, by what is fastest for decode (not by the training rule): -> (the model in
    its inference dtype, in eval mode; the Engine's keyword arguments for that path, "why" included for the logs).

    On a CPU with the CPU decoder built (nanochat/cpu_decode.py), it decodes whatever the CPU: the model stays in
    float32 and the decoder packs its own copy of the weights, in float32 or in bfloat16 panels (half the bytes a
    step streams, float32 activations). dtype picks the copy; "auto" measures both at batch 1 (probe_weight_dtype).
    Why not torch's bf16 on a CPU with AMX, which training uses (bf16 matmuls ~5x fp32 there)? At decode's one row
    per request a step is a few tiny matrix-vector products: measured on a 2-core Sapphire Rapids, torch bf16 decoded
    190 tok/s at batch 1 against 368 for the float32 kernels, and a lone chat client got 47 tok/s against 225.
    Elsewhere (a GPU, no CPU decoder, decoder="torch"), GPT.forward decodes in the training rule's dtype
    (common.get_compute_dtype: bf16 on CUDA and on CPUs with AMX or AVX512-BF16, fp32 otherwise), and bf16 weights halve the bytes per
    token (autocast would instead re-cast the fp32 weights at every step).
    """
    device, weights = model.get_device(), next(model.parameters())
    if decoder == "auto" and cpu_decode is not None and cpu_decode.usable(device, weights.dtype):
        if dtype == "auto":
            weight_dtype, timings = cpu_decode.probe_weight_dtype(model)
            measured = ", ".join(f"{str(d).removeprefix('torch.')} {1000 * t:.2f} ms" for d, t in timings.items())
            why = f"--dtype auto: the faster weight copy at batch 1 on this CPU ({measured} a step)"
        else:
            weight_dtype, why = getattr(torch, dtype), f"--dtype {dtype}"
        return model.eval(), {"cpu_weight_dtype": weight_dtype, "decoder": "auto", "why": why}
    compute_dtype = get_compute_dtype(device, dtype)
    if compute_dtype == torch.bfloat16:
        model = model.to(torch.bfloat16)
    reason = ("--decoder torch" if decoder == "torch" else "no CPU decoder here" if device.type == "cpu" else f"a {device.type} device")
    why = f"{reason}; --dtype {dtype}" + (" (the training rule: bf16 on CUDA and bf16-capable CPUs)" if dtype == "auto" else "")
    return model.eval(), {"decoder": "torch", "why": why}


class Row:
    """
    One sequence being decoded in a slot of a KVCache: its tokens so far, the tokens the engine must force into it
    next (tool output), its tool-call parsing state, and how it samples (rows that share a generator and settings
    are sampled in one call: the samples of one prompt in Engine.generate).
    """

    def __init__(self, slot, tokens, rng, temperature=1.0, top_k=None, top_p=None):
        self.slot, self.tokens = slot, list(tokens)
        self.forced_tokens = deque()
        self.in_python_block, self.python_tokens = False, []
        self.completed = False
        self.rng, self.temperature, self.top_k, self.top_p = rng, temperature, top_k or None, top_p
        self.greedy = temperature == 0.0 or top_k == 1

    def sampling(self):
        """What decides how this row samples: rows with equal keys are sampled in one multinomial call. The generator
        is part of it: Engine.generate's rows share one (as a batch they draw the same stream as ever), each server
        request has its own (its seed reproduces its reply whatever else is in the batch)."""
        return (id(self.rng), self.temperature, self.top_k, self.top_p)


class Engine:
    """
    A model ready to generate: it owns how decode steps run here (GPT.forward, or the CPU decoder), the chat
    format's special tokens, and tool calls. One per model replica; Engine.generate and the server both use it.
    """

    def __init__(self, model, tokenizer, tool_timeout=2.0, run_tools=True, allow_weak_sandbox=True, cpu_weight_dtype=torch.float32,
                 decoder="auto", why=None):
        """decoder: "auto" decodes with the CPU decoder where it runs, "torch" always with GPT.forward. why: the reason
        for that choice (prepare_for_inference's), for the logs and /stats."""
        self.model = model
        self.tokenizer = tokenizer
        self.why = why
        self.tool_timeout = tool_timeout
        self.run_tools = run_tools  # False: tool calls are generated but not run (nothing is forced in)
        self.allow_weak_sandbox = allow_weak_sandbox  # False: without bubblewrap, only calculator calls run
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.assistant_end, self.bos = special("<|assistant_end|>"), tokenizer.get_bos_token_id()
        weights = next(model.parameters())
        self.device = weights.device
        # the CPU speed layer when it runs here (CPU, float32 weights, extension built), else GPT.forward
        self.cpu_decoder = None
        if decoder not in ("auto", "torch"):
            raise ValueError(f"decoder must be 'auto' or 'torch' (got {decoder!r})")
        if decoder == "auto" and cpu_decode is not None and cpu_decode.usable(weights.device, weights.dtype):
            self.cpu_decoder = cpu_decode.CPUDecoder(model, cpu_weight_dtype)
        # fp32 weights on a GPU compute in bf16 (the cache then holds bf16 too, half the memory traffic)
        self.autocast = contextlib.nullcontext()
        self.cache_dtype = weights.dtype
        if weights.device.type == "cuda" and weights.dtype == torch.float32:
            self.autocast, self.cache_dtype = torch.autocast(device_type="cuda", dtype=torch.bfloat16), torch.bfloat16

    def describe(self):
        """How this engine decodes (and why, when prepare_for_inference chose it), for logs and /stats."""
        if self.cpu_decoder is not None:
            path = f"the CPU decoder (Rust, batch-invariant) with {str(self.cpu_decoder.weight_dtype).removeprefix('torch.')} weights"
        else:
            path = f"GPT.forward with {str(next(self.model.parameters()).dtype).removeprefix('torch.')} weights on {self.device.type}"
        return path + (f" ({self.why})" if self.why else "")

    def new_cache(self, num_slots, positions):
        """A KVCache of num_slots sequences with room for `positions` tokens each, in the dtype the steps write."""
        config = self.model.config
        cache = KVCache(num_slots, config.n_layer, config.n_kv_head, config.n_embd // config.n_head)
        cache.reserve(positions, self.cache_dtype, self.device)
        return cache

    def max_new_tokens(self, prompt_len, max_tokens=None):
        """What a reply may add to a prompt: max_tokens (default: all the room), never past the rotary table."""
        rotary_limit = self.model.cos.size(1)
        if max_tokens is None:
            max_tokens = rotary_limit - prompt_len
        return min(max_tokens, rotary_limit - prompt_len)

    @torch.inference_mode()
    def prefill(self, tokens, cache, slot):
        """The prompt `tokens` into `slot` of the cache (which must have room): -> fp32 logits [1, V] of its next token."""
        cache.reserve(len(tokens) + 1, self.cache_dtype, self.device)
        if self.cpu_decoder is not None:
            self.cpu_decoder.refresh()  # once per reply: RL trains the model between the replies it samples
        if self.cpu_decoder is not None and len(tokens) <= PREFILL_AS_STEP_MAX:
            cache.begin_step([slot] * len(tokens), range(len(tokens)))
            logits = self.cpu_decoder.step(tokens, cache.cache, cache.step_slots, cache.step_starts)[-1:]
            cache.end_step()
            return logits
        cache.begin_step([slot], [0])
        with self.autocast:
            logits = self.model(torch.tensor([tokens], dtype=torch.long, device=self.device), kv_cache=cache)[:, -1, :]
        cache.end_step(len(tokens))
        return logits

    @torch.inference_mode()
    def step(self, cache, rows, row_multiple=1):
        """
        One token for each row (its last one), each at its slot's length: -> fp32 logits [len(rows), V].
        row_multiple: GPT.forward sees a batch padded to a multiple of this many rows. MKL's sgemm computes a row
        the same way for every M that is a multiple of 4, but M = 1..3 take another kernel and M = 5..7 split
        rows unevenly between threads, so the server pads (4) where it needs a row's bits independent of its
        batch; the CPU decoder needs no padding, its arithmetic per row is fixed.
        """
        tokens = [row.tokens[-1] for row in rows]
        slots = [row.slot for row in rows]
        if self.cpu_decoder is not None:
            cache.begin_step(slots)
            logits = self.cpu_decoder.step(tokens, cache.cache, cache.step_slots, cache.step_starts)
        else:
            padded = -(-len(rows) // row_multiple) * row_multiple
            cache.begin_step(slots, padded_rows=padded)
            ids = torch.tensor(tokens + [0] * (padded - len(rows)), dtype=torch.long, device=self.device).unsqueeze(1)
            with self.autocast:
                logits = self.model(ids, kv_cache=cache)[:len(rows), -1, :]
        cache.end_step()
        return logits

    def advance(self, rows, logits):
        """
        Give each row its next token, from its logits (a row of `logits` per row): a forced token first (mask 0),
        else its sample (mask 1). -> (tokens, masks, tool calls: [(row, code)] of rows that just closed one).
        """
        greedy = logits.argmax(-1).tolist()  # one call for every greedy row: argmax is per row anyway
        tokens, masks = [None] * len(rows), [1] * len(rows)
        groups = {}
        for i, row in enumerate(rows):
            if row.forced_tokens:
                tokens[i], masks[i] = row.forced_tokens.popleft(), 0
            elif row.greedy:
                tokens[i] = greedy[i]
            else:
                groups.setdefault(row.sampling(), []).append(i)
        for indices in groups.values():
            first = rows[indices[0]]
            sampled = sample_next_token(logits[indices], first.rng, first.temperature, first.top_k, first.top_p)
            for i, token in zip(indices, sampled[:, 0].tolist()):
                tokens[i] = token
        calls = []
        for row, token in zip(rows, tokens):
            row.tokens.append(token)
            if not row.completed:
                code = self.handle_token(row, token)
                if code is not None:
                    calls.append((row, code))
        return tokens, masks, calls

    def is_reply_end(self, token):
        """The one end-of-reply check: the assistant closed its turn, or began a new document."""
        return token == self.assistant_end or token == self.bos

    def handle_token(self, row, token):
        """Advance one row's state machine after it received `token`; returns the code of a tool call it closed."""
        if self.is_reply_end(token):
            row.completed = True
        if token == self.python_start:
            row.in_python_block, row.python_tokens = True, []
        elif token == self.python_end and row.in_python_block:
            row.in_python_block = False
            code = self.tokenizer.decode(row.python_tokens) if row.python_tokens and self.run_tools else None
            row.python_tokens = []
            return code
        elif row.in_python_block:
            row.python_tokens.append(token)
        return None

    def tool_output_tokens(self, code):
        """Run a tool call; returns the tokens to force into the row: <|output_start|> result <|output_end|>."""
        try:
            text = run_tool_call(code, timeout=self.tool_timeout, allow_weak_sandbox=self.allow_weak_sandbox)
        except Exception as e:  # whatever the model wrote, the reply goes on: a failed call is an error the model reads
            text = f"Error: {type(e).__name__}"
        return self.output_tokens(text)

    def output_tokens(self, text):
        return [self.output_start] + self.tokenizer.encode(text) + [self.output_end]

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, top_p=None):
        """
        Stream num_samples samples of the prompt `tokens` (a list of ids). Yields (token_column, token_masks) each step:
        one token per row, mask 1 if sampled and 0 if forced (tool output). Stops when every row has finished
        (<|assistant_end|> or <|bos|>) or after max_tokens steps. Tool calls run inline, before the next step.
        """
        if not isinstance(tokens, list) or not tokens or not isinstance(tokens[0], int):
            raise ValueError("tokens must be a non-empty list of token ids")
        max_tokens = self.max_new_tokens(len(tokens), max_tokens)
        if max_tokens <= 0:
            return
        cache = self.new_cache(num_samples, len(tokens) + max_tokens)
        logits = self.prefill(tokens, cache, slot=0).expand(num_samples, -1)
        cache.copy_slot(0, range(1, num_samples))  # the prompt is prefilled once, whatever the number of samples
        rng = torch.Generator(device=self.device).manual_seed(seed)  # one generator: the rows are sampled together
        rows = [Row(slot, tokens, rng, temperature, top_k, top_p) for slot in range(num_samples)]
        for step in range(max_tokens):
            column, masks, calls = self.advance(rows, logits)
            for row, code in calls:
                row.forced_tokens.extend(self.tool_output_tokens(code))
            yield column, masks
            if all(row.completed for row in rows) or step == max_tokens - 1:
                break
            logits = self.step(cache, rows)

    def generate_batch(self, tokens, num_samples=1, keep_end_token=False, **kwargs):
        """
        Run generate to the end. Returns (results, masks): per row, the prompt plus its tokens up to the end token,
        which is left out unless keep_end_token (RL trains on it: ending the turn is one of the policy's actions).
        """
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for token_column, token_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, token_masks)):
                if completed[i]:
                    continue
                if self.is_reply_end(token):
                    completed[i] = True
                    if keep_end_token:
                        results[i].append(token)
                        masks[i].append(mask)
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(completed):
                break
        return results, masks


class IncrementalDecoder:
    """
    Turns a stream of token ids into text pieces that never end in half a UTF-8 character
    (a multi-byte character is often split across byte-level BPE tokens).
    Special tokens become `special_text[id]` (default: nothing shown), so tool calls can be displayed.
    """

    def __init__(self, tokenizer, special_text=None):
        self.tokenizer = tokenizer
        self.special_text = special_text or {}
        self.special_ids = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _token_bytes(self, token):
        encoding = getattr(self.tokenizer, "enc", None)
        if encoding is not None:
            return encoding.decode_single_token_bytes(token)
        return self.tokenizer.decode([token]).encode("utf-8")

    def feed(self, token):
        """Returns the text that is complete after this token ("" while in the middle of a character)."""
        if token in self.special_ids:
            return self.flush() + self.special_text.get(token, "")
        return self.utf8.decode(self._token_bytes(token))

    def flush(self):
        """Whatever bytes are pending, decoded with replacement characters (call at the end)."""
        return self.utf8.decode(b"", final=True)


def tool_call_display(tokenizer):
    """How the chat front ends show a tool call: the code and its output as fenced code blocks."""
    special = tokenizer.encode_special
    return {special("<|python_start|>"): "\n```python\n", special("<|python_end|>"): "\n```\n",
            special("<|output_start|>"): "```output\n", special("<|output_end|>"): "\n```\n"}


def assistant_parts(tokenizer, tokens):
    """
    A generated reply (token ids, without <|assistant_end|>) as assistant message content: a plain string,
    or a list of {"type": "text"|"python"|"python_output", "text"} parts when it used the tool, so a
    conversation fed back to the model renders exactly as it was generated.
    """
    kinds = {tokenizer.encode_special("<|python_start|>"): "python", tokenizer.encode_special("<|output_start|>"): "python_output"}
    closers = {tokenizer.encode_special("<|python_end|>"), tokenizer.encode_special("<|output_end|>")}
    parts, kind, current = [], "text", []
    for token in tokens + [None]:
        if token is None or token in kinds or token in closers:
            if current or kind != "text":
                parts.append({"type": kind, "text": tokenizer.decode(current)})
            kind, current = kinds.get(token, "text"), []
        else:
            current.append(token)
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts
