"""
Continuous batching (nanochat/batching.py) with real tiny models: a row's logits are bit-identical alone and
in a batch, so replies under load equal the same replies served alone; rows with different sampling settings
share a batch; rows that end or are cancelled leave without disturbing the others; replicas share one queue;
a full queue is refused; a tool call does not stall the batch.
"""
import copy
import threading
import time

import pytest
import torch
import torch.nn as nn

from nanochat.engine import Engine, IncrementalDecoder, Row
from nanochat.gpt import GPTConfig
from nanochat.batching import GenerationRequest, QueueFull, Batcher

from conftest import random_gpt

torch.set_num_threads(1)


class Reply:
    """Collects one request's events (with the time each arrived) from the batcher's thread."""

    def __init__(self, prompt, **options):
        self.events, self.done = [], threading.Event()
        self.request = GenerationRequest(prompt=prompt, emit=self.emit, **options)

    def emit(self, *event):
        self.events.append((time.perf_counter(), event))
        if event[0] in ("end", "error"):
            self.done.set()

    def wait(self, timeout=30):
        assert self.done.wait(timeout), f"no end after {timeout} s: {self.events}"
        return self

    @property
    def text(self):
        return "".join(event[1] for _, event in self.events if event[0] == "text")

    @property
    def end(self):
        return self.events[-1][1]


def serve(batcher, prompt, **options):
    """Submit one request and wait for its end."""
    reply = Reply(prompt, **options)
    batcher.submit(reply.request)
    return reply.wait()


def prompts_of(tokenizer, texts):
    return [tokenizer.render_for_completion([{"role": "user", "content": text}]) for text in texts]


TEXTS = ["hi", "The quick brown fox jumps over the lazy dog", "Once upon a time", "1 + 1 =",
         "Tell me about the sea, the waves, and the wind over the water", "a", "What is a cat?", "Count: one two three four"]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return random_gpt(tiny_tokenizer, sequence_len=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)  # grouped-query


def test_greedy_replies_under_load_equal_each_alone(tiny_tokenizer, model):
    engine = Engine(model, tiny_tokenizer)
    batcher = Batcher([engine], max_batch=8, queue_size=8)
    prompts = prompts_of(tiny_tokenizer, TEXTS)
    lengths = [12, 30, 20, 40, 25, 35, 15, 28]
    alone = [serve(batcher, prompt, max_tokens=n, temperature=0.0) for prompt, n in zip(prompts, lengths)]
    assert all(reply.end == ("end", "length", n) for reply, n in zip(alone, lengths))
    assert len({reply.text for reply in alone}) == len(alone)
    # served alone, a reply is what the engine's own batch-1 decode gives (the slot cache attends correctly)
    for prompt, reply, n in list(zip(prompts, alone, lengths))[:3]:
        tokens = engine.generate_batch(prompt, max_tokens=n, temperature=0.0)[0][0][len(prompt):]
        decoder = IncrementalDecoder(tiny_tokenizer)
        assert "".join(decoder.feed(token) for token in tokens) + decoder.flush() == reply.text

    # all 8 at once, then again with half of them joining while the others are mid-reply
    together = [Reply(prompt, max_tokens=n, temperature=0.0) for prompt, n in zip(prompts, lengths)]
    for reply in together:
        batcher.submit(reply.request)
    assert [reply.wait().text for reply in together] == [reply.text for reply in alone]
    staggered = [Reply(prompt, max_tokens=n, temperature=0.0) for prompt, n in zip(prompts, lengths)]
    for reply in staggered[:4]:
        batcher.submit(reply.request)
    while len(staggered[1].events) < 5:
        time.sleep(0.001)
    for reply in staggered[4:]:
        batcher.submit(reply.request)
    assert [reply.wait().text for reply in staggered] == [reply.text for reply in alone]
    stats = batcher.snapshot()
    assert stats["rows_in_flight"] == 0 and stats["kv_cache_bytes_in_use"] == 0 and stats["requests_served"] == 24


@pytest.mark.parametrize("prefill_as_step_max", [0, 10_000])
def test_both_prefill_paths_give_the_same_reply(tiny_tokenizer, model, monkeypatch, prefill_as_step_max):
    # with the CPU decoder a prompt up to PREFILL_AS_STEP_MAX tokens is prefilled as one decode step whose rows are its
    # tokens, a longer one by GPT.forward; either way the reply is the same greedy decode as GPT.forward's alone
    import nanochat.engine
    monkeypatch.setattr(nanochat.engine, "PREFILL_AS_STEP_MAX", prefill_as_step_max)
    batcher = Batcher([Engine(model, tiny_tokenizer)], max_batch=4, queue_size=4)
    reference = Engine(model, tiny_tokenizer, decoder="torch")
    for prompt in prompts_of(tiny_tokenizer, TEXTS[:2]):
        reply = serve(batcher, prompt, max_tokens=20, temperature=0.0)
        tokens = reference.generate_batch(prompt, max_tokens=20, temperature=0.0)[0][0][len(prompt):]
        decoder = IncrementalDecoder(tiny_tokenizer)
        assert "".join(decoder.feed(token) for token in tokens) + decoder.flush() == reply.text


@pytest.mark.parametrize("decoder", ["auto", "torch"])  # the CPU decoder where it is built, and GPT.forward with padding
@torch.inference_mode()
def test_a_rows_logits_are_bit_identical_alone_and_in_a_batch(tiny_tokenizer, model, decoder):
    # what makes greedy replies equal under load: one decode step gives a row the same logits, to the last bit,
    # whatever else is in the batch (a last-bit difference would flip a near-tie argmax sooner or later)
    engine = Engine(model, tiny_tokenizer, decoder=decoder)
    replica = Batcher([engine], max_batch=8, queue_size=0).replicas[0]
    cache = replica.cache
    rows = []
    for slot, prompt in enumerate(prompts_of(tiny_tokenizer, TEXTS[:7])):
        engine.prefill(prompt, cache, slot)
        rows.append(Row(slot, prompt + [7 + slot], rng=None, temperature=0.0))

    def logits_of(slots):
        lengths = list(cache.lengths)
        logits = engine.step(cache, [rows[slot] for slot in slots], replica.row_multiple)
        cache.lengths = lengths  # undo the step: every call sees the same cache
        return logits

    alone = torch.cat([logits_of([slot]) for slot in range(7)])
    for slots in ([0, 1], [2, 0, 1], [3, 1, 0, 2], [4, 0, 2, 1, 3], list(range(7))):
        together = logits_of(slots)
        assert torch.equal(together, alone[slots]), f"rows {slots}"


@pytest.mark.parametrize("path", ["cpu decoder float32", "cpu decoder bfloat16", "torch bfloat16", "torch float32"])
def test_every_decode_path_serves_the_engines_own_greedy_reply(tiny_tokenizer, model, path):
    """Each path prepare_for_inference can choose, through the server, gives what Engine.generate gives on that path."""
    from nanochat import cpu_decode
    from nanochat.engine import prepare_for_inference

    decoder, dtype = path.rsplit(" ", 1)
    if decoder == "cpu decoder" and not cpu_decode.available():
        pytest.skip("the decode_kernels extension is not installed")
    typed, decode_path = prepare_for_inference(copy.deepcopy(model), dtype, "auto" if decoder == "cpu decoder" else "torch")
    engine = Engine(typed, tiny_tokenizer, **decode_path)
    assert (engine.cpu_decoder is not None) == (decoder == "cpu decoder")
    batcher = Batcher([engine], max_batch=4, queue_size=4)
    prompts = prompts_of(tiny_tokenizer, TEXTS[:3])
    replies = [Reply(prompt, max_tokens=16, temperature=0.0) for prompt in prompts]
    for reply in replies:  # together: the path's batched steps, not only its lone-row ones
        batcher.submit(reply.request)
    for prompt, reply in zip(prompts, replies):
        tokens = engine.generate_batch(prompt, max_tokens=16, temperature=0.0)[0][0][len(prompt):]
        decoder_text = IncrementalDecoder(tiny_tokenizer)
        assert "".join(decoder_text.feed(token) for token in tokens) + decoder_text.flush() == reply.wait().text
    assert batcher.snapshot()["decode"] == engine.describe()
    batcher.close()


def test_rows_with_different_sampling_settings_share_a_batch(tiny_tokenizer, model):
    batcher = Batcher([Engine(model, tiny_tokenizer)], max_batch=8, queue_size=8)
    prompts = prompts_of(tiny_tokenizer, TEXTS[:6])
    settings = [dict(temperature=0.0), dict(temperature=1.0, seed=1), dict(temperature=1.0, seed=2),
                dict(temperature=0.7, top_k=5, seed=3), dict(temperature=1.2, top_p=0.5, seed=4),
                dict(temperature=1.0, seed=1, stop=["e"])]
    alone = [serve(batcher, prompt, max_tokens=24, **options) for prompt, options in zip(prompts, settings)]
    together = [Reply(prompt, max_tokens=24, **options) for prompt, options in zip(prompts, settings)]
    for reply in together:
        batcher.submit(reply.request)
    assert [reply.wait().text for reply in together] == [reply.text for reply in alone]
    assert [reply.end for reply in together] == [reply.end for reply in alone]
    assert alone[1].text != alone[2].text, "another seed samples another reply"
    # the stop sequence ends the reply right before its first "e" (the same seed without it shows where that is)
    unstopped = serve(batcher, prompts[5], max_tokens=24, temperature=1.0, seed=1).text
    assert "e" in unstopped, "pick another seed: this reply has no 'e' to stop at"
    assert alone[5].text == unstopped[:unstopped.index("e")] and alone[5].end[1] == "stop"


def test_rows_that_finish_or_are_cancelled_leave_without_disturbing_the_others(tiny_tokenizer, model):
    batcher = Batcher([Engine(model, tiny_tokenizer)], max_batch=4, queue_size=4)
    prompts = prompts_of(tiny_tokenizer, TEXTS[:4])
    alone = [serve(batcher, prompt, max_tokens=40, temperature=0.0).text for prompt in prompts[:2]]
    long_rows = [Reply(prompt, max_tokens=40, temperature=0.0) for prompt in prompts[:2]]
    short_row = Reply(prompts[2], max_tokens=3, temperature=0.0)
    cancelled_row = Reply(prompts[3], max_tokens=500, temperature=0.0)
    for reply in long_rows + [short_row, cancelled_row]:
        batcher.submit(reply.request)
    while len(cancelled_row.events) < 5:
        time.sleep(0.001)
    batcher.cancel(cancelled_row.request)
    assert cancelled_row.wait().end[:2] == ("end", "cancelled") and cancelled_row.end[2] < 100
    assert short_row.wait().end == ("end", "length", 3)
    assert [reply.wait().text for reply in long_rows] == alone
    # a request cancelled while it waits in the queue leaves it at once
    queued = Reply(prompts[0], max_tokens=10)
    batcher.cancel(queued.request)
    batcher.submit(queued.request)
    assert queued.wait().end[:2] == ("end", "cancelled")
    assert batcher.snapshot()["rows_in_flight"] == 0


def test_replicas_take_requests_from_one_queue(tiny_tokenizer, model):
    # --num-gpus: one replica per device, each with its own batch; here two replicas of one CPU model
    batcher = Batcher([Engine(model, tiny_tokenizer), Engine(model, tiny_tokenizer)], max_batch=2, queue_size=4)
    prompts = prompts_of(tiny_tokenizer, TEXTS[:6])
    alone = [serve(batcher, prompt, max_tokens=16, temperature=0.0).text for prompt in prompts]
    together = [Reply(prompt, max_tokens=16, temperature=0.0) for prompt in prompts]
    for reply in together:
        batcher.submit(reply.request)  # 4 rows in flight, 2 waiting
    assert [reply.wait().text for reply in together] == alone
    assert all(replica.cache.cache is not None for replica in batcher.replicas), "both replicas decoded"
    assert batcher.snapshot()["replicas"] == 2


def test_a_full_queue_is_refused(tiny_tokenizer, model):
    batcher = Batcher([Engine(model, tiny_tokenizer)], max_batch=1, queue_size=1)
    prompt = prompts_of(tiny_tokenizer, ["hi"])[0]
    running, waiting = Reply(prompt, max_tokens=500), Reply(prompt, max_tokens=500)
    batcher.submit(running.request)
    batcher.submit(waiting.request)
    with pytest.raises(QueueFull):
        batcher.submit(Reply(prompt, max_tokens=5).request)
    assert batcher.snapshot()["requests_rejected"] == 1
    for reply in (waiting, running):
        batcher.cancel(reply.request)
        assert reply.wait(5).end[:2] == ("end", "cancelled")


class ScriptedModel(nn.Module):
    """
    Stands in for a GPT whose keys are the token ids: it reads each row's whole context back from the
    KV cache (so it also checks that every slot holds exactly its own row's tokens) and predicts the next
    token of a script. A prompt with "tool" in it writes a tool call, waits for its output (predicting junk
    that the forced tokens override), then answers; any other prompt just answers.
    """

    def __init__(self, tokenizer, code):
        super().__init__()
        special = tokenizer.encode_special
        self.config = GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1, n_embd=1)
        self.weight = nn.Parameter(torch.zeros(1))
        self.cos = torch.zeros(1, 2560, 1, 1)  # the rotary table's length: how far the engine may generate
        self.tool_marker = tokenizer.encode("tool")[0]
        self.assistant_start, self.output_end = special("<|assistant_start|>"), special("<|output_end|>")
        self.tool_call = [special("<|python_start|>")] + tokenizer.encode(code) + [special("<|python_end|>")]
        self.tool_answer = tokenizer.encode(" So that is it.") + [special("<|assistant_end|>")]
        self.plain_answer = tokenizer.encode(" plain words" * 8) + [special("<|assistant_end|>")]
        self.junk = tokenizer.encode("x")[0]

    def next_token(self, context):
        if self.assistant_start not in context:  # a prompt row before the assistant's turn (a prefill step's rows)
            return self.junk
        start = len(context) - context[::-1].index(self.assistant_start)
        prompt, produced = context[:start], context[start:]
        if self.tool_marker not in prompt:
            return self.plain_answer[min(len(produced), len(self.plain_answer) - 1)]
        if self.output_end in produced:
            since = len(produced) - produced.index(self.output_end) - 1
            return self.tool_answer[min(since, len(self.tool_answer) - 1)]
        return self.tool_call[len(produced)] if len(produced) < len(self.tool_call) else self.junk

    def forward(self, idx, kv_cache=None):  # a prefill (one row, the prompt) or a step (one token per row)
        B, T = idx.shape
        keys = idx.float().view(B, 1, T, 1)
        kv_cache.attend(0, keys, keys, keys)
        logits = torch.zeros(B, T, self.config.vocab_size)
        for row, (slot, start) in enumerate(zip(kv_cache.step_slots, kv_cache.step_starts)):
            context = kv_cache.cache[0, 0, slot, 0, :start + T, 0].long().tolist()
            logits[row, -1] = -10.0
            logits[row, -1, self.next_token(context)] = 10.0
        return logits


def test_a_tool_call_runs_off_the_decode_loop(tiny_tokenizer):
    # a slow tool call (sandboxed Python that sleeps) in one row while another row decodes its whole reply
    model = ScriptedModel(tiny_tokenizer, "import time\ntime.sleep(1.5)\nprint(6 * 7)")
    batcher = Batcher([Engine(model, tiny_tokenizer, tool_timeout=10, decoder="torch")], max_batch=4, queue_size=4)
    tool_row = Reply(tiny_tokenizer.render_for_completion([{"role": "user", "content": "tool please"}]), max_tokens=80)
    plain_row = Reply(tiny_tokenizer.render_for_completion([{"role": "user", "content": "hello"}]), max_tokens=80)
    batcher.submit(tool_row.request)
    deadline = time.monotonic() + 30
    while "```python" not in tool_row.text:
        assert time.monotonic() < deadline and not tool_row.done.is_set(), f"no tool call: {tool_row.events}"
        time.sleep(0.001)
    batcher.submit(plain_row.request)
    plain_row.wait()
    tool_row.wait()
    assert plain_row.end[:2] == ("end", "stop") and plain_row.text == " plain words" * 8
    assert "```output\n42\n```" in tool_row.text and tool_row.text.endswith(" So that is it."), tool_row.text
    plain_done = plain_row.events[-1][0]
    output_shown = next(t for t, event in tool_row.events if event[0] == "text" and "output" in event[1])
    assert plain_done < output_shown, "the plain row waited for the other row's tool call"
