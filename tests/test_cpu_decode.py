"""
The batch-invariant CPU decode step (decode_kernels/ through nanochat/cpu_decode.py): it computes what the torch
model computes (to float32 rounding), a row's logits are the same bits whatever rows and threads share its step,
each row's key and value land at its own position, wrong inputs are refused with a ValueError, changed weights
are repacked, and without the extension the module still imports. The kernels' own tests: cargo test in decode_kernels/.
"""
import copy
import os
import subprocess
import sys
import weakref

import pytest
import torch

from nanochat import cpu_decode
from nanochat.cpu_decode import CPUDecoder, available, usable
from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_kernels = pytest.mark.skipif(not available(), reason="decode_kernels not installed (uv sync --extra cpu-kernels)")

VOCAB = 501  # 31 panels of 16 columns and a last one of 5


def make_gpt(n_layer=2, n_kv_head=4, seed=0, **tricks):
    """A random GPT at odd sizes: head_dim 12 (a dot product's 8 lanes plus a tail of 4), vocab 501 (a partial panel)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=n_layer, n_head=4, n_kv_head=n_kv_head, n_embd=48, **tricks))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # away from init's zeros and (1, 0) lambdas, so every path is exercised
    return model.eval()


def make_cache(model, slots, capacity, generator=None):
    """A decode cache [n_layer, 2, slots, n_kv_head, capacity, head_dim]: zeros, or random given a generator."""
    config = model.config
    shape = (config.n_layer, 2, slots, config.n_kv_head, capacity, config.n_embd // config.n_head)
    return torch.zeros(shape) if generator is None else torch.randn(shape, generator=generator)


def test_usable_only_on_cpu_in_float32():
    assert usable("cpu", torch.float32) == available()
    assert not usable("cpu", torch.bfloat16) and not usable("cuda", torch.float32)


@needs_kernels
@pytest.mark.parametrize("tricks", [dict(), dict(n_kv_head=2, x0_mixing=True, value_embeds=True)],
                         ids=["plain", "x0-mixing-value-embeds-gqa"])
def test_steps_compute_the_models_logits_and_cache_its_keys_and_values(tricks):
    model = make_gpt(n_layer=3, **tricks)
    decoder = CPUDecoder(model)
    texts = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    cache = make_cache(model, slots=3, capacity=16)
    first, second = [], []
    for t in range(12):  # two replies: slot 2 from the start, slot 0 five tokens later, each row at its own position
        if t < 5:
            first.append(decoder.step([texts[0, t].item()], cache, [2], [t])[0])
            continue
        logits = decoder.step(torch.stack([texts[0, t], texts[1, t - 5]]), cache, [2, 0], [t, t - 5])
        first.append(logits[0])
        second.append(logits[1])
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(first), model(texts[:1])[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.stack(second), model(texts[1:, :7])[0], rtol=1e-4, atol=1e-4)
        config = model.config
        prefill = KVCache(1, config.n_layer, config.n_kv_head, config.n_embd // config.n_head)
        prefill.begin_step([0])
        model(texts[:1], kv_cache=prefill)  # the keys (rotated, QK-normed) and values the torch model caches
    torch.testing.assert_close(cache[:, :, 2, :, :12], prefill.cache[:, :, 0, :, :12], rtol=1e-4, atol=1e-5)
    assert not cache[:, :, 1].any() and not cache[:, :, 0, :, 7:].any()  # nothing written where no row was


@needs_kernels
def test_a_step_writes_only_its_rows_keys_and_values():
    model = make_gpt(n_kv_head=2)
    cache = make_cache(model, slots=5, capacity=32, generator=torch.Generator().manual_seed(2))
    before = cache.clone()
    slots, positions = [3, 0, 4], [7, 0, 31]
    CPUDecoder(model).step([5, 6, 7], cache, slots, positions)
    written = torch.zeros_like(cache, dtype=torch.bool)
    for slot, position in zip(slots, positions):
        written[:, :, slot, :, position] = True
    assert torch.equal(cache[~written], before[~written])
    assert not torch.equal(cache[written], before[written])


@needs_kernels
def test_a_rows_logits_are_the_same_bits_alone_in_any_batch_and_on_any_thread_count(monkeypatch):
    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_WORK", 0)  # split every product and attention, however small
    model = make_gpt(n_kv_head=2, x0_mixing=True, value_embeds=True)
    decoder = CPUDecoder(model)
    generator = torch.Generator().manual_seed(3)
    cache = make_cache(model, slots=8, capacity=40, generator=generator)
    tokens = torch.randint(0, VOCAB, (8,), generator=generator)
    slots = torch.randperm(8, generator=generator).tolist()
    positions = [0, 39, 4, 17, 8, 3, 25, 12]  # a key count of 4k, 4k + 1..3: every tail of the 4-key scores

    def step(rows):
        return decoder.step(tokens[rows], cache.clone(), [slots[r] for r in rows], [positions[r] for r in rows])

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [step([r])[0] for r in range(8)]
        for count in (1, 2):
            torch.set_num_threads(count)
            for size in range(2, 9):
                rows = torch.randperm(8, generator=generator)[:size].tolist()
                logits = step(rows)
                for i, r in enumerate(rows):
                    assert torch.equal(logits[i], alone[r]), f"row {r} in a batch of {size} on {count} threads"
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_a_prompt_as_one_step_is_its_tokens_one_step_at_a_time():
    # the engine prefills short prompts as one step whose rows are the prompt's tokens in one slot
    model = make_gpt(n_kv_head=2, x0_mixing=True, value_embeds=True)
    decoder = CPUDecoder(model)
    prompt = [17, 4, 480, 4, 99, 3, 250]
    at_once, one_by_one = make_cache(model, 2, 8), make_cache(model, 2, 8)
    logits = decoder.step(prompt, at_once, [1] * len(prompt), list(range(len(prompt))))
    for position, token in enumerate(prompt):
        assert torch.equal(decoder.step([token], one_by_one, [1], [position])[0], logits[position])
    assert torch.equal(at_once, one_by_one) and not at_once[:, :, 0].any()


@needs_kernels
def test_bfloat16_panels_give_the_float32_step_of_the_rounded_weights():
    # bf16 panels widen exactly to the bf16-rounded weights: the step must give the same bits as float32 panels of
    # a model whose matrices were rounded first (the embedding and value tables stay float32 in both)
    model = make_gpt(n_kv_head=2, x0_mixing=True, value_embeds=True)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name.startswith(("transformer.h.", "lm_head.")):
                p.copy_(p.to(torch.bfloat16).float())
    rows = ([3, 9, 4, 400], [0, 1, 1, 2], [5, 0, 1, 7])
    bf16_cache, rounded_cache = make_cache(model, 3, 8), make_cache(model, 3, 8)
    bf16_logits = CPUDecoder(model, torch.bfloat16).step(rows[0], bf16_cache, *rows[1:])
    rounded_logits = CPUDecoder(rounded).step(rows[0], rounded_cache, *rows[1:])
    assert torch.equal(bf16_logits, rounded_logits) and torch.equal(bf16_cache, rounded_cache)
    assert not torch.equal(bf16_logits, CPUDecoder(model).step(rows[0], make_cache(model, 3, 8), *rows[1:]))


def change_in_place(model, other):
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # an optimizer step or a copy_: the version counter moves


def load_state(model, other):
    model.load_state_dict(other.state_dict())


def load_state_by_assignment(model, other):
    model.load_state_dict(other.state_dict(), assign=True)  # new Parameter objects


def swap_data(model, other):
    model.transformer.h[1].mlp.c_fc.weight.data = other.transformer.h[1].mlp.c_fc.weight.detach().clone()  # what .to() does


@needs_kernels
@pytest.mark.parametrize("change", [change_in_place, load_state, load_state_by_assignment, swap_data])
def test_changed_weights_are_repacked(change):
    model, other = make_gpt(x0_mixing=True, value_embeds=True), make_gpt(x0_mixing=True, value_embeds=True, seed=1)
    decoder = CPUDecoder(model)
    rows = ([3, 9], [0, 1], [2, 5])
    cache = make_cache(model, 2, 8, generator=torch.Generator().manual_seed(4))
    before = decoder.step(rows[0], cache.clone(), *rows[1:])
    packed = weakref.ref(decoder.kernels)
    change(model, other)
    decoder.refresh()  # what the engine calls once per reply, at its prefill
    after = decoder.step(rows[0], cache.clone(), *rows[1:])
    assert not torch.equal(after, before)
    assert torch.equal(after, CPUDecoder(model).step(rows[0], cache.clone(), *rows[1:]))  # a fresh packing's logits
    assert packed() is None  # the stale packed copy is gone, not kept next to the new one


@needs_kernels
def test_wrong_inputs_are_refused_with_a_clear_value_error():
    model = make_gpt(n_kv_head=2)  # rotary table: 640 positions (10 x sequence_len)
    decoder = CPUDecoder(model)
    cache = make_cache(model, slots=2, capacity=8)
    refusals = [
        (([1], make_cache(make_gpt(n_kv_head=4), 2, 8), [0], [0]), r"cache has shape \[2, 2, 2, 4, 8, 12\]"),
        (([1], cache.double(), [0], [0]), "float32"),
        (([1], cache.bfloat16(), [0], [0]), "cache"),
        (([1], make_cache(model, 2, 16)[:, :, :, :, :8], [0], [0]), "C-contiguous"),
        (([1], cache, [0], [8]), r"position 8 is outside the cache \(0..8\)"),
        (([1], cache, [0], [-1]), "position -1 is outside the cache"),
        (([1], make_cache(model, 1, 641), [0], [640]), r"position 640 is past the rotary table \(640 positions\)"),
        (([1], cache, [2], [0]), r"slot 2 is outside the cache's slots \(0..2\)"),
        (([VOCAB], cache, [0], [0]), r"token 501 is outside the vocabulary \(0..501\)"),
        (([-1], cache, [0], [0]), "token -1 is outside the vocabulary"),
        (([1, 2], cache, [0], [0, 1]), "one of each per row"),
    ]
    for arguments, message in refusals:
        with pytest.raises(ValueError, match=message):
            decoder.step(*arguments)
    assert not cache.any()  # nothing written by a refused step
    # the extension's own checks on what CPUDecoder always passes right: the logits buffer, a read-only cache
    logits = torch.empty(1, VOCAB).numpy()
    read_only = cache.numpy().copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        decoder.kernels.step([1], [0], [0], read_only, logits, 1, 0)
    with pytest.raises(ValueError, match=r"logits has shape \[2, 501\]"):
        decoder.kernels.step([1], [0], [0], cache.numpy(), torch.empty(2, VOCAB).numpy(), 1, 0)
    inside_the_cache = cache.view(-1)[:VOCAB].view(1, VOCAB).numpy()
    with pytest.raises(ValueError, match="must not share memory"):
        decoder.kernels.step([1], [0], [0], cache.numpy(), inside_the_cache, 1, 0)


@pytest.mark.slow
def test_without_the_extension_the_module_imports_and_is_not_usable():
    code = """
import sys
sys.modules["decode_kernels"] = None  # import decode_kernels now raises ImportError, as when it is not installed
import torch
from nanochat import cpu_decode
assert not cpu_decode.available() and not cpu_decode.usable("cpu", torch.float32)
try:
    cpu_decode.CPUDecoder(None)
except RuntimeError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cpu-kernels" in result.stdout
