"""
Continuous batching: many requests share one model's forward passes.

Decode is memory-bound: a step reads every weight once whether it computes 1 row or 8, so one step for
8 users costs far less than 8 steps of one. Each model replica runs one loop on its own thread, over the
engine's own calls (nanochat/engine.py: prefill, step, advance) and one KVCache with a slot per row:

    1. admit    a waiting request takes a free slot: its prompt is prefilled there and its first token
                is taken. It joins the next step.
    2. step     one forward pass for every row that has a token to feed, each row at its own position,
                then each row takes its next token (forced tool output first, else its own sample, with its
                own settings and its own random generator).
    3. retire   a row that ended (end of turn, a stop sequence, max tokens, client gone) leaves at once
                and its slot is free for the next request.

This is Engine.generate's loop with another feeder: generate's rows all start together from one prompt,
here they come and go. A row whose tool call is running sits out the steps (the call runs on a small
thread pool, not on the decode loop) and comes back when its output is ready to be forced in. Requests
beyond the slots of all replicas wait in one shared, bounded queue; beyond that submit() raises QueueFull
(the server's 503).

Why a row's output does not depend on the other rows (greedy replies are the same text under load as alone):
- a prompt is always prefilled on its own, and each row samples from its own logits with its own generator;
- on a CPU the engine's CPU decoder (nanochat/cpu_decode.py) gives every output number one fixed chain of
  fused multiply-adds, whatever the batch: no padding needed, and it beats MKL's small-M sgemm;
- elsewhere (a GPU, bf16 weights, a build without the CPU decoder) attention runs row by row over each
  row's own keys (KVCache.attend) and the matmuls see a batch padded to a multiple of ROW_MULTIPLE rows
  (Engine.step). Padding costs a lone request ~half its speed; --max-batch 1 pads nothing.
"""
import atexit
import os
import threading
import weakref
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from nanochat.common import logger
from nanochat.engine import IncrementalDecoder, Row, tool_call_display

ROW_MULTIPLE = 4  # without the CPU decoder, decode batches are padded to a multiple of this many rows (docstring)
IDLE_WAIT_S = 0.05  # how often a loop whose rows all wait on tool calls looks for cancellations
LIVE_BATCHERS = weakref.WeakSet()  # closed at exit, before the interpreter shuts down under their threads


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its limit."""


@dataclass
class GenerationRequest:
    """
    One reply to generate. `emit(*event)` is called from the replica's thread with ("text", str) pieces,
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
    # set by the server when the client hangs up; an Event because two threads read it (the loop and the server's)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Reply:
    """A request in flight: its engine Row (slot, tokens, sampler), its text so far and the stop sequences it waits for."""

    def __init__(self, request, slot, engine):
        self.request = request
        # OpenAI seeds may be negative; torch wants 0..2**64-1. No seed: a fresh random one per request.
        seed = request.seed % 2**63 if request.seed is not None else int.from_bytes(os.urandom(4), "little")
        rng = torch.Generator(device=engine.device).manual_seed(seed)
        self.row = Row(slot, request.prompt, rng, request.temperature, request.top_k, request.top_p)
        self.max_tokens = min(request.max_tokens, engine.max_new_tokens(len(request.prompt)))
        self.decoder = IncrementalDecoder(engine.tokenizer, special_text=tool_call_display(engine.tokenizer))
        self.hold_back = max((len(s) for s in request.stop), default=1) - 1  # text that might still become a stop sequence
        self.pending_text = ""
        self.generated = 0
        self.tool_call = None  # a Future while this row's tool call runs

    def add_text(self, piece):
        """
        Take the text of one more token; emit what can no longer become a stop sequence. True: a stop sequence hit.
        A stop sequence may arrive split over tokens ("\n\nUser" as "\n", "\nUs", "er"), so the last
        len(longest stop) - 1 characters are held back until the next token shows whether they start one: the client
        never receives text that a stop sequence then cuts off.
        """
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
    """One model (an Engine) with its batch: a KVCache of max_batch slots and the thread that decodes them."""

    def __init__(self, index, engine, batcher, max_batch):
        self.index, self.engine, self.batcher = index, engine, batcher
        self.cache = engine.new_cache(max_batch, 1)  # grows (in CACHE_CHUNK positions) as requests need room
        # padding for batch-invariant bits on the GPU.forward path; a replica of one row never shares a step
        self.row_multiple = ROW_MULTIPLE if max_batch > 1 and engine.cpu_decoder is None else 1
        self.free_slots = list(range(max_batch))
        self.replies = []
        self.in_flight = 0  # replies plus requests being admitted (read by the batcher under its lock)
        self.tools = ThreadPoolExecutor(max_workers=max_batch, thread_name_prefix=f"tools{index}")
        self.thread = threading.Thread(target=self.loop, name=f"replica{index}", daemon=True)

    def loop(self):
        """The replica's thread: admit, step, retire, until the batcher closes."""
        while not self.batcher.closed:
            try:
                self.iterate()
            except Exception as e:  # a bug in one reply's bookkeeping ends the replies in flight, not the replica
                logger.exception("batching step failed")
                for reply in list(self.replies):
                    self.finish(reply, "error", f"generation failed: {type(e).__name__}")

    def iterate(self):
        """One turn of the loop. New requests are admitted first, so a request that arrives during a step joins the
        very next one; rows waiting on a tool call sit out; with nothing to step, the thread sleeps until woken
        (a submit, a finished tool call) or, while tool calls run, for IDLE_WAIT_S to notice cancellations."""
        for request in self.batcher.take_waiting(self):
            self.admit(request)
        self.collect_tool_outputs()
        self.retire_cancelled()
        ready = [reply for reply in self.replies if reply.tool_call is None]
        if ready:
            self.step(ready)
        else:
            self.batcher.wait_for_work(self, IDLE_WAIT_S if self.replies else None)

    def admit(self, request):
        """Prefill a request's prompt into a free slot and take its first token. The prompt is prefilled alone, never
        with other rows, so its keys and values, and so its reply, do not depend on the batch it joins."""
        reply = Reply(request, self.free_slots.pop(), self.engine)
        if request.cancelled.is_set() or reply.max_tokens <= 0:
            return self.finish(reply, "cancelled" if request.cancelled.is_set() else "length")
        try:
            # room for the whole reply now: growing the cache later copies every slot, in the middle of other replies
            self.cache.reserve(len(request.prompt) + reply.max_tokens, self.engine.cache_dtype, self.engine.device)
            self.cache.lengths[reply.row.slot] = 0
            logits = self.engine.prefill(request.prompt, self.cache, reply.row.slot)
        except Exception as e:  # a request that cannot run must not take the loop down
            logger.exception("prefill failed")
            return self.finish(reply, "error", f"generation failed: {type(e).__name__}")
        self.replies.append(reply)
        self.batcher.count_tokens(1)
        self.advance([reply], logits)

    def step(self, replies):
        """One decode step for the replies that have a token to feed: one forward pass for all of them."""
        try:
            logits = self.engine.step(self.cache, [reply.row for reply in replies], self.row_multiple)
        except Exception as e:
            logger.exception("decode step failed")
            for reply in replies:
                self.finish(reply, "error", f"generation failed: {type(e).__name__}")
            return
        self.batcher.count_tokens(len(replies))
        self.advance(replies, logits)

    def advance(self, replies, logits):
        """Each reply takes its next token (engine.advance), then its text, stop sequences, length and tool call."""
        tokens, _, calls = self.engine.advance([reply.row for reply in replies], logits)
        tool_calls = {id(row): code for row, code in calls}
        for reply, token in zip(replies, tokens):
            reply.generated += 1
            if reply.row.completed or reply.add_text(reply.decoder.feed(token)):
                self.finish(reply, "stop")
            elif reply.generated >= reply.max_tokens:
                self.finish(reply, "length")
            elif id(reply.row) in tool_calls:
                # the call runs on the pool (a sandboxed interpreter takes ~20 ms, a slow program up to its timeout) while
                # the other rows keep decoding; the callback wakes the loop, which forces the output in at the next turn
                reply.tool_call = self.tools.submit(self.engine.tool_output_tokens, tool_calls[id(reply.row)])
                reply.tool_call.add_done_callback(lambda _: self.batcher.wake())

    def collect_tool_outputs(self):
        """Rows whose tool call finished get its output queued as forced tokens and rejoin the steps."""
        for reply in self.replies:
            if reply.tool_call is not None and reply.tool_call.done():
                reply.row.forced_tokens.extend(reply.tool_call.result())  # tool_output_tokens turns any failure into text
                reply.tool_call = None

    def retire_cancelled(self):
        """A client that hung up (the server cancels its request) frees its slot before the next step, not after max_tokens."""
        for reply in [reply for reply in self.replies if reply.request.cancelled.is_set()]:
            self.finish(reply, "cancelled")

    def finish(self, reply, reason, error=None):
        """The reply leaves the batch: its last text and its end event go out, its slot is free at once."""
        request = reply.request
        if error is not None:
            request.emit("error", error)
        else:
            if reason == "length":
                # cut off mid-character: the bytes held for a multi-byte character go out as a replacement character
                reply.pending_text += reply.decoder.flush()
            if reply.pending_text:
                request.emit("text", reply.pending_text)
            request.emit("end", reason, reply.generated)
        if reply in self.replies:
            self.replies.remove(reply)
        # the slot's keys stay in memory, but with length 0 nothing reads them: the next reply overwrites them
        self.cache.lengths[reply.row.slot] = 0
        self.free_slots.append(reply.row.slot)
        self.batcher.retired(self, reply)


class Batcher:
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
        self.closed = False
        for replica in self.replicas:
            replica.thread.start()
        LIVE_BATCHERS.add(self)

    def close(self):
        """Stop the replica threads after their current step (requests still in flight are dropped). Called at exit
        too: a replica thread still freeing its step's tensors while the interpreter shuts down aborts the process."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        for replica in self.replicas:
            if replica.thread is not threading.current_thread():
                replica.thread.join(timeout=10)

    def submit(self, request):
        """Queue a request for the next free slot. Raises QueueFull when the slots and the queue are all taken."""
        with self.lock:
            # a bounded queue: beyond it a client is better served by a quick 503 and Retry-After than by a request
            # that waits minutes and times out anyway, holding a connection and memory meanwhile
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
        """The requests `replica` may admit now (as many as it has free slots). One shared queue, taken from by every
        replica as it frees slots: a request goes to whichever GPU has room first, not to a fixed one."""
        taken = []
        with self.lock:
            while self.waiting and replica.in_flight < self.max_batch:
                taken.append(self.waiting.popleft())
                replica.in_flight += 1
        return taken

    def wait_for_work(self, replica, timeout):
        """Sleep until there is something to admit (or timeout, or close): an idle replica costs no CPU."""
        with self.lock:
            if not (self.waiting and replica.in_flight < self.max_batch) and not self.closed:
                self.lock.wait(timeout)

    def wake(self):
        """Called from a tool-call thread when its call ends: the replica waiting on it has work again."""
        with self.lock:
            self.lock.notify_all()

    def retired(self, replica, reply):
        """A reply left its replica: one slot free for the queue."""
        with self.lock:
            replica.in_flight -= 1
            self.stats["requests_served"] += 1
            self.lock.notify_all()

    def count_tokens(self, count):
        """Tokens generated, per second for the last minute (the rate /stats reports), and in all."""
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
            return {"replicas": len(self.replicas), "max_batch": self.max_batch, "decode": self.replicas[0].engine.describe(),
                    "rows_in_flight": self.rows_in_flight(), "requests_waiting": len(self.waiting),
                    "queue_size": self.queue_size, "tokens_per_s_last_minute": round(last_minute / 60, 1),
                    "kv_cache_bytes_in_use": sum(sum(c.lengths) * c.bytes_per_position() for c in caches),
                    "kv_cache_bytes_allocated": sum(0 if c.cache is None else c.cache.numel() * c.cache.element_size()
                                                    for c in caches),
                    **self.stats}


@atexit.register
def close_live_batchers():
    for batcher in list(LIVE_BATCHERS):
        batcher.close()
