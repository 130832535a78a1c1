"""Engine: KV-cache decode equals naive recompute, seeds, sampling, tool-use forcing, streaming UTF-8 decode."""
import time

import pytest
import torch
import torch.nn as nn

from nanochat.engine import (Engine, IncrementalDecoder, KVCache, Row, assistant_parts, prepare_for_inference, run_tool_call,
                             sample_next_token)
from nanochat.gpt import GPTConfig

from conftest import random_gpt

torch.set_num_threads(1)


PROMPTS = ["The quick brown fox", "Once upon a time there was", "1 + 1 ="]


@pytest.mark.parametrize("n_kv_head", [4, 2])  # plain multi-head and grouped-query attention
def test_kv_cache_greedy_matches_naive_recompute(tiny_tokenizer, n_kv_head):
    model = random_gpt(tiny_tokenizer, n_kv_head=n_kv_head)
    engine = Engine(model, tiny_tokenizer)
    for prompt in PROMPTS:
        tokens = tiny_tokenizer.encode(prompt, prepend="<|bos|>")
        naive = list(model.generate(tokens, max_tokens=24, temperature=0.0))
        results, masks = engine.generate_batch(tokens, num_samples=3, max_tokens=24, temperature=0.0)
        assert len(set(naive)) > 3, "degenerate model: the comparison would prove little"
        for row, mask in zip(results, masks):
            assert row[len(tokens):] == naive
            assert mask[len(tokens):] == [1] * len(naive)


def test_generation_past_the_cache_chunk_matches_naive(tiny_tokenizer):
    # a long prompt + generation crosses several rotary/cache positions; the cache must stay exact
    model = random_gpt(tiny_tokenizer, n_layer=1)
    engine = Engine(model, tiny_tokenizer)
    tokens = tiny_tokenizer.encode("word " * 60, prepend="<|bos|>")
    naive = list(model.generate(tokens, max_tokens=8, temperature=0.0))
    results, _ = engine.generate_batch(tokens, max_tokens=8, temperature=0.0)
    assert results[0][len(tokens):] == naive


def test_kv_cache_grows_and_keeps_contents():
    cache = KVCache(num_slots=2, num_layers=1, num_kv_heads=1, head_dim=4)
    first = torch.randn(2, 1, 3, 4)
    cache.begin_step([0, 1])
    cache.attend(0, first, first, first)
    cache.end_step(3)
    capacity = cache.capacity
    more = torch.randn(2, 1, capacity, 4)  # forces a reallocation
    cache.begin_step([0, 1])
    cache.attend(0, more, more, more)
    cache.end_step(capacity)
    assert cache.capacity > capacity and cache.lengths == [3 + capacity] * 2
    assert torch.equal(cache.cache[0, 0, :, :, :3], first) and torch.equal(cache.cache[0, 1, :, :, 3:3 + capacity], more)


def test_seed_reproduces_and_rows_sample_independently(tiny_tokenizer):
    model = random_gpt(tiny_tokenizer)
    engine = Engine(model, tiny_tokenizer)
    tokens = tiny_tokenizer.encode("Hello", prepend="<|bos|>")
    run = lambda seed: engine.generate_batch(tokens, num_samples=4, max_tokens=16, temperature=1.0, seed=seed)[0]
    first, again, other = run(1), run(1), run(2)
    assert first == again
    assert first != other
    assert len({tuple(row) for row in first}) == 4, "rows must not share their samples"
    # top_k=1 is greedy whatever the temperature; top_k=0 means no top-k
    greedy = engine.generate_batch(tokens, max_tokens=10, temperature=0.0)[0]
    assert engine.generate_batch(tokens, max_tokens=10, temperature=1.5, top_k=1, seed=3)[0] == greedy
    assert engine.generate_batch(tokens, num_samples=4, max_tokens=16, temperature=1.0, top_k=0, seed=1)[0] == first


def test_sample_next_token_filters():
    rng = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0, 1.0]] * 200)
    assert set(sample_next_token(logits, rng, 1.0, top_k=2).flatten().tolist()) == {1, 2}
    assert set(sample_next_token(logits, rng, 1.0, top_p=0.9).flatten().tolist()) == {1, 2}
    assert set(sample_next_token(logits, rng, 1.0, top_p=0.01).flatten().tolist()) == {1}
    assert sample_next_token(logits[:1], rng, 0.0).item() == 1


class ScriptedModel(nn.Module):
    """
    Stands in for a GPT: always predicts the next token of a script. It writes a tool call, then
    waits (predicting junk that the engine must override) until it has been fed <|output_end|>,
    then finishes its answer. It records every token fed to it.
    """

    def __init__(self, tokenizer, code, answer):
        super().__init__()
        special = tokenizer.encode_special
        self.config = GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.weight = nn.Parameter(torch.zeros(1))
        self.cos = torch.zeros(1, 100_000, 1, 1)  # the rotary table's length: how far the engine may generate
        self.before = [special("<|python_start|>")] + tokenizer.encode(code) + [special("<|python_end|>")]
        self.after = tokenizer.encode(answer) + [special("<|assistant_end|>")]
        self.output_end = special("<|output_end|>")
        self.junk = tokenizer.encode("x")[0]
        self.fed = []

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        self.fed.extend(idx[0].tolist())
        produced = len(self.fed) - self.prompt_len
        if self.output_end in self.fed:
            since = len(self.fed) - self.fed.index(self.output_end) - 1
            next_token = self.after[min(since, len(self.after) - 1)]
        elif produced < len(self.before):
            next_token = self.before[produced]
        else:
            next_token = self.junk  # the engine is forcing the tool output now
        logits = torch.full((B, T, self.config.vocab_size), -10.0)
        logits[:, -1, next_token] = 10.0
        return logits


def run_scripted(tokenizer, code, answer, tool_timeout=2.0, max_tokens=60):
    model = ScriptedModel(tokenizer, code, answer)
    prompt = tokenizer.encode("question", prepend="<|bos|>")
    model.prompt_len = len(prompt)
    engine = Engine(model, tokenizer, tool_timeout=tool_timeout, decoder="torch")  # a stand-in model: GPT.forward's interface only
    results, masks = engine.generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return results[0][len(prompt):], masks[0][len(prompt):]


def test_tool_call_output_is_forced_with_mask_zero(tiny_tokenizer):
    special = tiny_tokenizer.encode_special
    tokens, masks = run_scripted(tiny_tokenizer, '"strawberry".count("r") * 14', "So 42.")
    text = tiny_tokenizer.decode(tokens)
    assert text.endswith('<|python_end|><|output_start|>42<|output_end|>So 42.'), text
    start, end = tokens.index(special("<|output_start|>")), tokens.index(special("<|output_end|>"))
    assert set(masks[start:end + 1]) == {0}  # forced: the model is never trained/scored on tool output
    assert set(masks[:start]) == {1} and set(masks[end + 1:]) == {1}


def test_failing_or_slow_tool_call_gives_an_error_not_a_stall(tiny_tokenizer):
    tokens, _ = run_scripted(tiny_tokenizer, "1/0", "ok")
    assert "<|output_start|>Error: ZeroDivisionError" in tiny_tokenizer.decode(tokens)
    t0 = time.time()
    tokens, _ = run_scripted(tiny_tokenizer, "sum(range(10**12))", "ok", tool_timeout=0.5)
    assert time.time() - t0 < 5
    assert "Error: timed out" in tiny_tokenizer.decode(tokens)
    assert tiny_tokenizer.decode(tokens).endswith("ok")


@pytest.mark.parametrize("code, error", [("-" * 3000 + "1", "RecursionError"), ("x" + "[0]" * 3000, "RecursionError"),
                                         ("(" * 300 + ")" * 300, "SyntaxError: too many nested parentheses"),
                                         ("print(1", "SyntaxError: '(' was never closed")])
def test_a_tool_call_the_parser_gives_up_on_is_an_error_in_the_reply(tiny_tokenizer, code, error):
    """Code nested a few thousand deep made CPython's parser raise RecursionError out of Engine.generate."""
    tokens, _ = run_scripted(tiny_tokenizer, code, "ok", max_tokens=len(tiny_tokenizer.encode(code)) + 40)
    text = tiny_tokenizer.decode(tokens)
    assert f"<|output_start|>Error: {error}" in text and text.endswith("ok")


def test_run_tool_call_expressions_and_statements():
    assert run_tool_call("12*7") == "84"
    assert run_tool_call("'banana'.count('a')") == "3"
    assert run_tool_call("x = 3\nprint(x * 2)") == "6"
    assert len(run_tool_call("print('a' * 100000)")) <= 200


def test_incremental_decoder_never_emits_half_a_character(tiny_tokenizer):
    text = "naïve café 日本語 🙂 done"
    ids = tiny_tokenizer.encode(text)
    decoder = IncrementalDecoder(tiny_tokenizer)
    pieces = [decoder.feed(token) for token in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece == "") > 0, "multi-byte characters span several byte-level tokens"


def test_assistant_parts_round_trip_a_tool_call(tiny_tokenizer):
    special = tiny_tokenizer.encode_special
    tokens = (tiny_tokenizer.encode("Let me count. ") + [special("<|python_start|>")] + tiny_tokenizer.encode("'aab'.count('a')")
              + [special("<|python_end|>"), special("<|output_start|>")] + tiny_tokenizer.encode("2") + [special("<|output_end|>")]
              + tiny_tokenizer.encode("Two."))
    parts = assistant_parts(tiny_tokenizer, tokens)
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
    assert parts[1]["text"] == "'aab'.count('a')" and parts[2]["text"] == "2"
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": parts}]
    ids, _ = tiny_tokenizer.render_conversation(conversation)
    assert ids[-len(tokens) - 1:-1] == tokens  # renders back to exactly the generated tokens
    assert assistant_parts(tiny_tokenizer, tiny_tokenizer.encode("plain")) == "plain"


def test_inference_picks_the_cpu_decoder_whatever_the_cpu_and_says_why(tiny_tokenizer):
    """On a CPU the decoder's kernels decode whenever they are built (an AMX CPU's bf16 torch path decoded 2-5x slower):
    the model stays float32 and --dtype picks the decoder's weight copy, auto by measuring both. GPT.forward otherwise."""
    from nanochat import cpu_decode
    from nanochat.common import get_compute_dtype

    if not cpu_decode.available():
        pytest.skip("the decode_kernels extension is not installed (uv sync --extra cpu-kernels)")
    tokens = tiny_tokenizer.encode("Hello", prepend="<|bos|>")
    for dtype, copy_dtypes in (("auto", (torch.float32, torch.bfloat16)), ("float32", (torch.float32,)), ("bfloat16", (torch.bfloat16,))):
        model, decode_path = prepare_for_inference(random_gpt(tiny_tokenizer), dtype)
        engine = Engine(model, tiny_tokenizer, **decode_path)
        assert not model.training and model.lm_head.weight.dtype == torch.float32
        assert engine.cpu_decoder is not None and engine.cpu_decoder.weight_dtype in copy_dtypes
        assert f"--dtype {dtype}" in engine.describe() and "CPU decoder" in engine.describe()
        assert len(engine.generate_batch(tokens, max_tokens=5, temperature=0.0)[0][0]) == len(tokens) + 5
    _, decode_path = prepare_for_inference(random_gpt(tiny_tokenizer), "auto")
    assert "float32" in decode_path["why"] and "bfloat16" in decode_path["why"] and " ms" in decode_path["why"]  # the probe's figures
    # --decoder torch: GPT.forward in the training rule's dtype (bf16 on AMX CPUs)
    model, decode_path = prepare_for_inference(random_gpt(tiny_tokenizer), "auto", decoder="torch")
    engine = Engine(model, tiny_tokenizer, **decode_path)
    assert engine.cpu_decoder is None and model.lm_head.weight.dtype == get_compute_dtype(torch.device("cpu"))
    assert "GPT.forward" in engine.describe() and "--decoder torch" in engine.describe()


def test_the_engine_and_the_server_decode_with_the_cpu_decoder_on_cpu_float32_only(tiny_tokenizer):
    """The engine picks the speed layer (the model knows nothing of it); GPT.forward elsewhere, padded in the server."""
    from nanochat import cpu_decode
    from nanochat.batching import Batcher

    if not cpu_decode.available():
        pytest.skip("the decode_kernels extension is not installed (uv sync --extra cpu-kernels)")
    engine = Engine(random_gpt(tiny_tokenizer, n_layer=1), tiny_tokenizer)
    assert engine.cpu_decoder is not None and "CPU decoder" in engine.describe()
    assert Batcher([engine], max_batch=4, queue_size=0).replicas[0].row_multiple == 1  # batch-invariant: no padding
    for other in (Engine(random_gpt(tiny_tokenizer, n_layer=1).to(torch.bfloat16), tiny_tokenizer),
                  Engine(random_gpt(tiny_tokenizer, n_layer=1), tiny_tokenizer, decoder="torch")):
        assert other.cpu_decoder is None and "GPT.forward" in other.describe()
        assert Batcher([other], max_batch=4, queue_size=0).replicas[0].row_multiple == 4  # GPT.forward pads to 4 rows


@pytest.mark.parametrize("prompt_text", ["Tell me about the sea.", "word " * 150])  # a prompt as one step, and by GPT.forward
def test_the_cpu_decoder_decodes_what_gpt_forward_computes(tiny_tokenizer, prompt_text):
    from nanochat import cpu_decode

    if not cpu_decode.available():
        pytest.skip("the decode_kernels extension is not installed (uv sync --extra cpu-kernels)")
    model = random_gpt(tiny_tokenizer, sequence_len=256, n_layer=2, n_kv_head=2)  # GQA too
    engine = Engine(model, tiny_tokenizer)
    prompt = tiny_tokenizer.encode(prompt_text, prepend="<|bos|>")
    tokens = tiny_tokenizer.encode(" and the wind is cold.")
    cache = engine.new_cache(2, len(prompt) + len(tokens))
    with torch.inference_mode():
        logits = [engine.prefill(prompt, cache, slot=1)[0]]
        for token in tokens[:-1]:
            row = Row(1, [token], rng=None, temperature=0.0)
            logits.append(engine.step(cache, [row])[0])
        full = model(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1:]
    torch.testing.assert_close(torch.stack(logits), full, rtol=1e-4, atol=1e-4)
    assert cache.lengths == [0, len(prompt) + len(tokens) - 1] and not cache.cache[:, :, 0].any()
