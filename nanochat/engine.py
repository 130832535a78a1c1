"""
Fast inference: a preallocated KV cache, batched sampling, and tool use.

The engine prefills the prompt once (batch 1), copies that cache into `num_samples` rows, then
decodes one token per step for all rows together. When a row writes
<|python_start|> code <|python_end|>, the engine runs the code in the sandbox (nanochat/execution.py)
and forces <|output_start|> result <|output_end|> into that row; forced tokens have mask 0.
Calculator calls (arithmetic, string counting) skip the sandbox: nanochat/calculator.py evaluates them in-process.

Everything the model sees per step is one token per row, so the work per token is one small
forward pass; the Python around it is kept to a handful of operations per step.

Engine.generate serves one prompt (its rows share it: RL, evals, the CLI). Serving many users at once,
each row with its own prompt, position and settings, is nanochat/scheduler.py; both use the row state
machine here (handle_token, tool_output_tokens), so a reply ends and a tool call runs the same way.
"""
import ast
import codecs
import contextlib
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.calculator import NotCalculable, calculate
from nanochat.common import cpu_has_fast_bf16, get_compute_dtype
from nanochat.exact_decode import ExactDecode, usable
from nanochat.execution import execute_code, sandbox_is_strong

CACHE_CHUNK = 1024  # the cache grows in steps of this many positions (rarely: the first size is prompt + max_tokens)
MAX_TOOL_OUTPUT_CHARS = 200  # what a tool call can force into the context; a runaway print must not flood it


class KVCache:
    """
    Keys and values for every layer in one preallocated tensor [n_layer, 2, B, n_kv_head, capacity, head_dim].
    Allocated on the first insert, in the dtype and device of the keys (= the compute dtype under autocast).
    The forward pass calls insert_kv once per layer; the position advances after the last layer.
    """

    def __init__(self, batch_size, num_heads, head_dim, num_layers, seq_len):
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_layers = num_layers
        self.capacity = seq_len
        self.cache = None
        self.pos = 0
        self.decode_tables = None  # set by GPT.decode_step: its derived weights, checked once per cache
        self.kernels = None  # set by Engine on CPU float32: the exact decode kernels (nanochat/exact_decode.py)

    def reset(self):
        self.pos = 0
        self.decode_tables = None

    def get_pos(self):
        return self.pos

    def _allocate(self, capacity, like):
        shape = (self.num_layers, 2, self.batch_size, self.num_heads, capacity, self.head_dim)
        new_cache = torch.empty(shape, dtype=like.dtype, device=like.device)
        if self.cache is not None and self.pos > 0:
            new_cache[:, :, :, :, :self.pos] = self.cache[:, :, :, :, :self.pos]
        self.cache = new_cache
        self.capacity = capacity

    def _make_room(self, end, like):
        """Room for positions [0, end), in like's dtype and device when the cache is first made."""
        if self.cache is None or end > self.capacity:
            self._allocate(max(self.capacity, (end + CACHE_CHUNK - 1) // CACHE_CHUNK * CACHE_CHUNK), like)

    def insert_kv(self, layer_idx, k, v):
        # k, v: [B, H, T_new, D]; returns views of all cached keys/values [B, H, pos + T_new, D]
        t_new = k.size(2)
        end = self.pos + t_new
        self._make_room(end, k)
        layer_cache = self.cache[layer_idx]
        layer_cache[0, :, :, self.pos:end] = k
        layer_cache[1, :, :, self.pos:end] = v
        keys, values = layer_cache[0, :, :, :end], layer_cache[1, :, :, :end]
        if layer_idx == self.num_layers - 1:
            self.pos = end
        return keys, values

    def kernel_rows(self, like):
        """With kernels: (cache, slots, positions) of a decode step, every row at self.pos. The position advances
        now: GPT.decode_step runs the whole step, every layer, in the one call these feed."""
        self._make_room(self.pos + 1, like)
        rows = (self.cache, list(range(self.batch_size)), [self.pos] * self.batch_size)
        self.pos += 1
        return rows

    def prefill(self, other):
        """Copy another cache (usually batch 1, after the prompt) into every row of this one."""
        assert other.cache is not None, "prefill from an empty cache"
        assert self.num_layers == other.num_layers and self.num_heads == other.num_heads
        assert other.batch_size in (1, self.batch_size)
        needed = max(self.capacity, other.pos)
        if self.cache is None or self.capacity < needed or self.cache.dtype != other.cache.dtype:
            self.cache = None
            self.pos = 0
            self._allocate(needed, other.cache)
        self.cache[:, :, :, :, :other.pos] = other.cache[:, :, :, :, :other.pos]  # broadcasts batch 1 to B
        self.pos = other.pos


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """logits [B, V] -> token ids [B, 1]. temperature 0 is greedy; top_k None/0 and top_p None/1 mean no filtering."""
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


def prepare_for_inference(model, dtype="auto"):
    """
    Keep the weights in the inference dtype once: decode reads every weight for every token, so bf16 weights
    halve the bytes per token (autocast would instead re-cast the fp32 weights at every step).
    dtype "auto" decides as training does (common.get_compute_dtype): bf16 on CUDA and on CPUs with AMX,
    fp32 elsewhere (without AMX, bf16 matmuls are emulated: slower than fp32, not faster).
    On a CPU without AMX, an explicit "bfloat16" keeps the model in fp32 and gives only the decode kernels a bf16
    copy (model.decode_weight_dtype, read by Engine): fp32 activations, half the weight bytes, no emulated matmuls.
    """
    device = model.get_device()
    if get_compute_dtype(device, dtype) == torch.bfloat16:
        if device.type == "cpu" and not cpu_has_fast_bf16() and usable(device, next(model.parameters()).dtype):
            model.decode_weight_dtype = torch.bfloat16
        else:
            model = model.to(torch.bfloat16)
    return model.eval()


class RowState:
    """Per-sample bookkeeping during decode: its tokens, tokens to force next, tool-call parsing."""

    def __init__(self, tokens):
        self.tokens = list(tokens)
        self.forced_tokens = deque()
        self.in_python_block = False
        self.python_tokens = []
        self.completed = False


class Engine:

    def __init__(self, model, tokenizer, tool_timeout=2.0, run_tools=True, allow_weak_sandbox=True):
        self.model = model
        self.tokenizer = tokenizer
        self.tool_timeout = tool_timeout
        self.run_tools = run_tools  # False: tool calls are generated but not run (nothing is forced in)
        self.allow_weak_sandbox = allow_weak_sandbox  # False: without bubblewrap, only calculator calls run
        self.exact = None  # nanochat/exact_decode.py's kernels, made on first use (decode_kernels)
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.assistant_end, self.bos = special("<|assistant_end|>"), tokenizer.get_bos_token_id()

    def _autocast(self, device):
        # fp32 weights on a GPU: compute in bf16 (the cache then holds bf16 too, half the memory traffic)
        if device.type == "cuda" and self.model.get_device().type == "cuda":
            weight = next(self.model.parameters(), None)
            if weight is not None and weight.dtype == torch.float32:
                return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _new_cache(self, batch_size, seq_len):
        config = self.model.config
        cache = KVCache(batch_size=batch_size, num_heads=config.n_kv_head, head_dim=config.n_embd // config.n_head,
                        num_layers=config.n_layer, seq_len=seq_len)
        cache.kernels = self.decode_kernels()  # decode steps run on them when set: ~4x torch's speed on CPU here
        return cache

    def decode_kernels(self):
        """The exact CPU decode kernels (nanochat/exact_decode.py) for this model, or None where they do not run."""
        weights = next(self.model.parameters())
        if not usable(weights.device, weights.dtype):
            return None
        if self.exact is None:  # one per engine: the packed weights outlive each reply's cache
            self.exact = ExactDecode(getattr(self.model, "decode_weight_dtype", torch.float32))
        return self.exact

    def is_reply_end(self, token):
        """The one end-of-reply check: the assistant closed its turn, or began a new document."""
        return token == self.assistant_end or token == self.bos

    def handle_token(self, state, token):
        """
        Advance one row's state machine after it received `token`. Returns the code of a tool call that
        this token closed (the caller runs it: inline here in generate, off the decode loop in the scheduler).
        """
        if self.is_reply_end(token):
            state.completed = True
        if token == self.python_start:
            state.in_python_block = True
            state.python_tokens = []
        elif token == self.python_end and state.in_python_block:
            state.in_python_block = False
            code = self.tokenizer.decode(state.python_tokens) if state.python_tokens and self.run_tools else None
            state.python_tokens = []
            return code
        elif state.in_python_block:
            state.python_tokens.append(token)
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

    def max_new_tokens(self, prompt_len, max_tokens=None):
        """What a reply may add to a prompt: max_tokens (default: all the room), never past the rotary table."""
        rotary_limit = self.model.cos.size(1) if hasattr(self.model, "cos") else None
        if max_tokens is None:
            max_tokens = (rotary_limit or prompt_len + 1024) - prompt_len
        if rotary_limit is not None:
            max_tokens = min(max_tokens, rotary_limit - prompt_len)
        return max_tokens

    def prefill(self, tokens):
        """The prompt through the model at batch 1: (fp32 logits of the next token [1, V], its KVCache)."""
        device = self.model.get_device()
        prompt_cache = self._new_cache(1, len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        with self._autocast(device):
            logits = self.model.forward(ids, kv_cache=prompt_cache)[:, -1, :]
        return logits, prompt_cache

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, top_p=None):
        """
        Stream samples for the prompt `tokens` (a list of ids). Yields (token_column, token_masks) each step:
        one token per row, mask 1 if sampled and 0 if forced (tool output). Stops when every row has
        finished (<|assistant_end|> or <|bos|>) or after max_tokens steps.
        """
        if not isinstance(tokens, list) or not tokens or not isinstance(tokens[0], int):
            raise ValueError("tokens must be a non-empty list of token ids")
        device = self.model.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        top_k = top_k or None
        max_tokens = self.max_new_tokens(len(tokens), max_tokens)
        if max_tokens <= 0:
            return
        autocast = self._autocast(device)

        # 1) prefill the prompt once, at batch 1
        logits, prompt_cache = self.prefill(tokens)
        logits = logits.expand(num_samples, -1)

        # 2) one cache row per sample, sized for the whole generation so it never grows mid-stream
        decode_cache = self._new_cache(num_samples, len(tokens) + max_tokens)
        decode_cache.prefill(prompt_cache)
        del prompt_cache

        rows = [RowState(tokens) for _ in range(num_samples)]
        for step in range(max_tokens):
            next_ids = sample_next_token(logits, rng, temperature, top_k, top_p)  # [B, 1]
            sampled = next_ids[:, 0].tolist()
            token_column, token_masks = [], []
            any_forced = False
            for state, token in zip(rows, sampled):
                if state.forced_tokens:
                    token = state.forced_tokens.popleft()
                    token_masks.append(0)
                    any_forced = True
                else:
                    token_masks.append(1)
                token_column.append(token)
                state.tokens.append(token)
                if not state.completed:
                    code = self.handle_token(state, token)
                    if code is not None:
                        state.forced_tokens.extend(self.tool_output_tokens(code))
            yield token_column, token_masks
            if all(state.completed for state in rows) or step == max_tokens - 1:
                break
            if any_forced:
                next_ids = torch.tensor(token_column, dtype=torch.long, device=device).unsqueeze(1)
            with autocast:
                logits = self.model.forward(next_ids, kv_cache=decode_cache)[:, -1, :]

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
