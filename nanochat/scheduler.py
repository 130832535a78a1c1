"""
Continuous batching: many requests share one model's forward passes.

Decode is memory-bound: a step reads every weight once whether it computes 1 row or 8, so one step for
8 users costs far less than 8 steps of one. Each model replica runs one loop on its own thread:

    1. admit    a waiting request takes a free slot: its prompt is prefilled alone (a short one as one
                kernel step whose rows are its tokens, a long one by the model at batch 1, its keys and
                values copied into the slot), and its first token is sampled. It joins the next step.
    2. step     one forward pass for every row that has a token to feed, each row at its own position
                (SlotCache keeps a length per slot), then each row picks its next token with its own
                sampling settings and its own random generator.
    3. retire   a row that ended (end of turn, a stop sequence, max tokens, client gone) leaves at once
                and its slot is free for the next request.

A row whose tool call is running sits out the steps (the call runs on a small thread pool, not on the
decode loop) and comes back when its output is ready to be forced in. Requests beyond the slots of all
replicas wait in one shared, bounded queue; beyond that submit() raises QueueFull (the server's 503).

Why a row's output does not depend on the other rows (greedy replies are the same text under load as alone):
- a prompt is always prefilled on its own, and each row samples from its own logits with its own torch.Generator;
- on CPU in float32 the step's matmuls and attention run in Rust kernels (nanochat/exact_decode.py) that give
  every output number one fixed chain of fused multiply-adds, whatever the batch: no padding needed, and they
  beat MKL's small-M sgemm (the whole step is one Rust call; 8 rows cost ~2-3x one row);
- elsewhere (CUDA, bf16, a build without the kernels) attention runs row by row over each row's own keys
  and the matmuls see a batch padded to a multiple of ROW_MULTIPLE rows: MKL's sgemm computes a row the same
  way for every M that is a multiple of 4, but M = 1..3 take another kernel and M = 5..7 split the rows
  unevenly between threads. Padding costs a lone request ~half its speed; --max-batch 1 pads nothing.
"""
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from nanochat.common import logger
from nanochat.engine import CACHE_CHUNK, IncrementalDecoder, RowState, sample_next_token, tool_call_display

ROW_MULTIPLE = 4  # without the exact kernels, decode batches are padded to a multiple of this many rows (docstring)
# longer prompts: the model's prefill at batch 1 (MKL, SDPA) is faster. Depth 4, as one step vs the model:
# 64 tokens 13.1 vs 15.5 ms, 128: 23.3 vs 23.9, 192: 35.7 vs 31.7 (each row attends alone, so its cost grows as T^2)
PREFILL_AS_STEP_MAX = 128
IDLE_WAIT_S = 0.05  # how often a loop whose rows all wait on tool calls looks for cancellations


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its limit."""


@dataclass
class GenerationRequest:
    """
    One reply to generate. `emit(*event)` is called from the scheduler's thread with ("text", str) pieces,
    then ("end", finish_reason, completion_tokens) or ("error", message). finish_reason: "stop" (end of turn
    or a stop sequence), "length" (max_tokens), "cancelled".
    """
    prompt: list
    emit: Callable
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = None
    top_p: float = None
    seed: int = None  # None: a fresh random one
    stop: list = field(default_factory=list)  # stop sequences (text): the reply ends before the first one
    cancelled: threading.Event = field(default_factory=threading.Event)


class SlotCache:
    """
    The batch's keys and values: [n_layer, 2, slots, n_kv_head, capacity, head_dim], one slot per row in
    flight and a length per slot. Grown in CACHE_CHUNK positions when a request needs more room.
    A decode step names the slots it feeds (begin_step); the model then calls attend() once per layer,
    which writes each row's new key/value at that row's own position and attends each row over its own length.
    """

    def __init__(self, num_slots, num_layers, num_kv_heads, head_dim, kernels=None):
        self.num_slots, self.num_layers, self.num_kv_heads, self.head_dim = num_slots, num_layers, num_kv_heads, head_dim
        # the engine's exact CPU kernels: decode_step runs the whole step with them on kernel_rows;
        # None: torch, with attend() and padded batches
        self.kernels = kernels
        self.cache = None  # allocated on the first prompt, in its dtype and device
        self.capacity = 0
        self.lengths = [0] * num_slots
        self.decode_tables = None  # set by GPT.decode_step
        self.step_slots, self.step_lengths, self.positions = [], [], None

    def reserve(self, positions, like):
        """Make room for `positions` per slot (keeps the contents)."""
        if self.cache is not None and positions <= self.capacity:
            return
        capacity = (positions + CACHE_CHUNK - 1) // CACHE_CHUNK * CACHE_CHUNK
        shape = (self.num_layers, 2, self.num_slots, self.num_kv_heads, capacity, self.head_dim)
        new_cache = torch.zeros(shape, dtype=like.dtype, device=like.device)
        if self.cache is not None:
            new_cache[..., :self.capacity, :] = self.cache
        self.cache, self.capacity = new_cache, capacity

    def store_prompt(self, slot, prompt_cache):
        """Copy a batch-1 KVCache (a prefilled prompt) into `slot`."""
        length = prompt_cache.get_pos()
        self.cache[:, :, slot, :, :length] = prompt_cache.cache[:, :, 0, :, :length]
        self.lengths[slot] = length

    def begin_step(self, slots, padded_rows, positions=None):
        """positions: each row's position, by default its slot's length. A prompt is a step of its tokens in
        one slot at positions 0..T-1: every row's key is written before any row attends, so it is causal."""
        self.step_slots = slots
        self.step_lengths = [self.lengths[s] for s in slots] if positions is None else positions
        device = self.cache.device
        self.slot_index = torch.tensor(slots, device=device)
        self.position_index = torch.tensor(self.step_lengths, device=device)
        # padded rows sit at position 0: their rotary angle is valid and their output is never read
        self.positions = torch.tensor(self.step_lengths + [0] * (padded_rows - len(slots)), device=device)

    def get_pos(self):
        return self.positions

    def attend(self, layer_idx, q, k, v):
        """q [B, H, 1, D], k and v [B, Hkv, 1, D] of the new tokens (B padded) -> attention output [B, H, 1, D]."""
        rows = len(self.step_slots)
        layer = self.cache[layer_idx]
        # advanced indices (slot, position) around a slice: each selects [rows, Hkv, D], one position per row
        layer[0, self.slot_index, :, self.position_index] = k[:rows, :, 0]
        layer[1, self.slot_index, :, self.position_index] = v[:rows, :, 0]
        gqa = q.size(1) != k.size(1)
        outputs = [F.scaled_dot_product_attention(q[i:i + 1], layer[0, slot:slot + 1, :, :length + 1],
                                                  layer[1, slot:slot + 1, :, :length + 1], enable_gqa=gqa)
                   for i, (slot, length) in enumerate(zip(self.step_slots, self.step_lengths))]
        if q.size(0) > rows:
            outputs.append(q.new_zeros((q.size(0) - rows,) + q.shape[1:]))
        return torch.cat(outputs)

    def kernel_rows(self, like):
        """With kernels: (cache, slots, positions) of this step, for GPT.decode_step's one-call step."""
        return self.cache, self.step_slots, self.step_lengths

    def end_step(self):
        for slot in self.step_slots:
            self.lengths[slot] += 1

    def bytes_per_position(self):
        return 0 if self.cache is None else self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.cache.element_size()


class Row:
    """One request in flight: its slot, its token state, its sampler, its text so far."""

    def __init__(self, request, slot, engine):
        self.request, self.slot = request, slot
        self.state = RowState(request.prompt)
        self.max_tokens = min(request.max_tokens, engine.max_new_tokens(len(request.prompt)))
        device = engine.model.get_device()
        # OpenAI seeds may be negative; torch wants 0..2**64-1. No seed: a fresh random one per request.
        seed = request.seed % 2**63 if request.seed is not None else int.from_bytes(os.urandom(4), "little")
        self.rng = torch.Generator(device=device).manual_seed(seed)
        self.greedy = request.temperature == 0.0 or request.top_k == 1
        self.decoder = IncrementalDecoder(engine.tokenizer, special_text=tool_call_display(engine.tokenizer))
        self.hold_back = max((len(s) for s in request.stop), default=1) - 1  # text that might still become a stop sequence
        self.pending_text = ""
        self.generated = 0
        self.next_input = None  # the last token this row produced: fed at its next step
        self.tool_call = None  # a Future while this row's tool call runs

    def sample(self, logits):
        """This row's next token from its logits [1, V], with its own settings and generator."""
        r = self.request
        return sample_next_token(logits, self.rng, r.temperature, r.top_k or None, r.top_p).item()

    def add_text(self, piece):
        """Take the text of one more token; emit what can no longer become a stop sequence. True: a stop sequence hit."""
        self.pending_text += piece
        hits = [self.pending_text.find(s) for s in self.request.stop if s in self.pending_text]
        if hits:
            self.pending_text = self.pending_text[:min(hits)]
            return True
        if len(self.pending_text) > self.hold_back:
            cut = len(self.pending_text) - self.hold_back
            self.request.emit("text", self.pending_text[:cut])
            self.pending_text = self.pending_text[cut:]
        return False


class Replica:
    """One model (an Engine) with its batch: a slot cache of max_batch rows and the thread that decodes them."""

    def __init__(self, index, engine, scheduler, max_batch):
        self.index, self.engine, self.scheduler = index, engine, scheduler
        config = engine.model.config
        self.cache = SlotCache(max_batch, config.n_layer, config.n_kv_head, config.n_embd // config.n_head,
                               kernels=engine.decode_kernels())
        self.free_slots = list(range(max_batch))
        self.rows = []
        self.in_flight = 0  # rows plus requests being admitted (read by the scheduler under its lock)
        self.tools = ThreadPoolExecutor(max_workers=max_batch, thread_name_prefix=f"tools{index}")
        self.thread = threading.Thread(target=self.loop, name=f"replica{index}", daemon=True)

    def loop(self):
        while True:
            try:
                self.iterate()
            except Exception as e:  # a bug in one row's bookkeeping ends the rows in flight, not the replica
                logger.exception("scheduler step failed")
                for row in list(self.rows):
                    self.finish(row, "error", f"generation failed: {type(e).__name__}")

    def iterate(self):
        for request in self.scheduler.take_waiting(self):
            self.admit(request)
        self.collect_tool_outputs()
        self.retire_cancelled()
        ready = [row for row in self.rows if row.tool_call is None]
        if ready:
            self.step(ready)
        else:
            self.scheduler.wait_for_work(self, IDLE_WAIT_S if self.rows else None)

    @torch.inference_mode()
    def admit(self, request):
        slot = self.free_slots.pop()
        row = Row(request, slot, self.engine)
        if request.cancelled.is_set() or row.max_tokens <= 0:
            return self.finish(row, "cancelled" if request.cancelled.is_set() else "length")
        try:
            # in the weights' dtype, which decode steps write (a prefill under autocast may have cached bf16)
            self.cache.reserve(len(request.prompt) + row.max_tokens, next(self.engine.model.parameters()))
            if self.cache.kernels is not None and len(request.prompt) <= PREFILL_AS_STEP_MAX:
                logits = self.prefill_as_step(slot, request.prompt)
            else:
                logits, prompt_cache = self.engine.prefill(request.prompt)
                self.cache.store_prompt(slot, prompt_cache)
        except Exception as e:  # a request that cannot run must not take the loop down
            logger.exception("prefill failed")
            return self.finish(row, "error", f"generation failed: {type(e).__name__}")
        self.rows.append(row)
        self.scheduler.count_tokens(1)
        self.advance(row, None if row.greedy else row.sample(logits), logits.argmax(-1).item())

    def prefill_as_step(self, slot, prompt):
        """A short prompt through the exact decode kernels: one step whose rows are its tokens, all in `slot`."""
        ids = torch.tensor(prompt, dtype=torch.long).unsqueeze(1)
        self.cache.begin_step([slot] * len(prompt), len(prompt), positions=list(range(len(prompt))))
        logits = self.engine.model.decode_step(ids, self.cache)[-1:]
        self.cache.end_step()
        return logits

    @torch.inference_mode()
    def step(self, rows):
        padded = self.padded_rows(len(rows))
        inputs = [row.next_input for row in rows] + [0] * (padded - len(rows))
        ids = torch.tensor(inputs, dtype=torch.long, device=self.cache.cache.device).unsqueeze(1)
        try:
            self.cache.begin_step([row.slot for row in rows], padded)
            logits = self.engine.model.decode_step(ids, self.cache)
            self.cache.end_step()
        except Exception as e:
            logger.exception("decode step failed")
            for row in rows:
                self.finish(row, "error", f"generation failed: {type(e).__name__}")
            return
        greedy_tokens = logits.argmax(-1).tolist()  # one call for every greedy row: argmax is per row anyway
        self.scheduler.count_tokens(len(rows))
        for i, row in enumerate(rows):
            skip_sampling = row.greedy or row.state.forced_tokens  # a forced token replaces the sample: draw none
            self.advance(row, None if skip_sampling else row.sample(logits[i:i + 1]), greedy_tokens[i])

    def padded_rows(self, rows):
        # exact kernels need no padding; nor does a replica of one row (it never shares a step)
        multiple = ROW_MULTIPLE if self.cache.num_slots > 1 and self.cache.kernels is None else 1
        return -(-rows // multiple) * multiple

    def advance(self, row, sampled, greedy):
        """Give `row` its next token (a forced tool-output token first, else its sample) and act on it."""
        state = row.state
        token = state.forced_tokens.popleft() if state.forced_tokens else (greedy if sampled is None else sampled)
        state.tokens.append(token)
        row.generated += 1
        row.next_input = token
        code = self.engine.handle_token(state, token)
        if state.completed:
            return self.finish(row, "stop")
        if row.add_text(row.decoder.feed(token)):
            return self.finish(row, "stop")
        if row.generated >= row.max_tokens:
            return self.finish(row, "length")
        if code is not None:
            row.tool_call = self.tools.submit(self.engine.tool_output_tokens, code)
            row.tool_call.add_done_callback(lambda _: self.scheduler.wake())

    def collect_tool_outputs(self):
        for row in self.rows:
            if row.tool_call is not None and row.tool_call.done():
                try:
                    row.state.forced_tokens.extend(row.tool_call.result())
                except Exception as e:  # the model still gets an answer and the row goes on
                    row.state.forced_tokens.extend(self.engine.output_tokens(f"Error: {type(e).__name__}"))
                row.tool_call = None

    def retire_cancelled(self):
        for row in [row for row in self.rows if row.request.cancelled.is_set()]:
            self.finish(row, "cancelled")

    def finish(self, row, reason, error=None):
        """The row leaves the batch: its last text and its end event go out, its slot is free at once."""
        request = row.request
        if error is not None:
            request.emit("error", error)
        else:
            if reason == "length":
                row.pending_text += row.decoder.flush()
            if row.pending_text:
                request.emit("text", row.pending_text)
            request.emit("end", reason, row.generated)
        if row in self.rows:
            self.rows.remove(row)
        self.cache.lengths[row.slot] = 0
        self.free_slots.append(row.slot)
        self.scheduler.retired(self, row)


class Scheduler:
    """
    The replicas (one per Engine, each with up to max_batch rows) and the one queue they take requests from.
    Thread-safe: submit() and cancel() come from the web server's event loop, the rest runs on replica threads.
    """

    def __init__(self, engines, max_batch=8, queue_size=32):
        if max_batch < 1 or queue_size < 0:
            raise ValueError(f"max_batch must be at least 1 and queue_size at least 0 (got {max_batch}, {queue_size})")
        self.max_batch, self.queue_size = max_batch, queue_size
        self.lock = threading.Condition()
        self.waiting = deque()
        self.replicas = [Replica(i, engine, self, max_batch) for i, engine in enumerate(engines)]
        self.stats = {"requests_served": 0, "tokens_generated": 0, "requests_rejected": 0}
        self.tokens_per_second = deque()  # [second, tokens] for the last minute
        for replica in self.replicas:
            replica.thread.start()

    def submit(self, request):
        """Queue a request for the next free slot. Raises QueueFull when the slots and the queue are all taken."""
        with self.lock:
            free = sum(self.max_batch - replica.in_flight for replica in self.replicas)
            if len(self.waiting) >= self.queue_size + free:
                self.stats["requests_rejected"] += 1
                raise QueueFull(f"server busy: {self.rows_in_flight()} replies in flight and {len(self.waiting)} "
                                f"requests waiting (the queue limit); retry shortly")
            self.waiting.append(request)
            self.lock.notify_all()

    def cancel(self, request):
        """Stop a request: dropped from the queue at once, or retired by its replica at the next step."""
        with self.lock:
            request.cancelled.set()
            if request in self.waiting:
                self.waiting.remove(request)
                request.emit("end", "cancelled", 0)
                self.stats["requests_served"] += 1
            self.lock.notify_all()

    def take_waiting(self, replica):
        """The requests `replica` may admit now (as many as it has free slots)."""
        taken = []
        with self.lock:
            while self.waiting and replica.in_flight < self.max_batch:
                taken.append(self.waiting.popleft())
                replica.in_flight += 1
        return taken

    def wait_for_work(self, replica, timeout):
        with self.lock:
            if not (self.waiting and replica.in_flight < self.max_batch):
                self.lock.wait(timeout)

    def wake(self):
        with self.lock:
            self.lock.notify_all()

    def retired(self, replica, row):
        with self.lock:
            replica.in_flight -= 1
            self.stats["requests_served"] += 1
            self.lock.notify_all()

    def count_tokens(self, count):
        now = int(time.time())
        with self.lock:
            self.stats["tokens_generated"] += count
            if self.tokens_per_second and self.tokens_per_second[-1][0] == now:
                self.tokens_per_second[-1][1] += count
            else:
                self.tokens_per_second.append([now, count])
            while self.tokens_per_second[0][0] < now - 60:
                self.tokens_per_second.popleft()

    def rows_in_flight(self):
        return sum(replica.in_flight for replica in self.replicas)

    def snapshot(self):
        """What /stats reports."""
        with self.lock:
            now = int(time.time())
            last_minute = sum(count for second, count in self.tokens_per_second if second >= now - 60)
            caches = [replica.cache for replica in self.replicas]
            return {"replicas": len(self.replicas), "max_batch": self.max_batch,
                    "rows_in_flight": self.rows_in_flight(), "requests_waiting": len(self.waiting),
                    "queue_size": self.queue_size, "tokens_per_s_last_minute": round(last_minute / 60, 1),
                    "kv_cache_bytes_in_use": sum(sum(c.lengths) * c.bytes_per_position() for c in caches),
                    "kv_cache_bytes_allocated": sum(0 if c.cache is None else c.cache.numel() * c.cache.element_size()
                                                    for c in caches),
                    **self.stats}
