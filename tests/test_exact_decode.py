"""
The Rust decode kernels (rustbpe/src/decode.rs through nanochat/exact_decode.py): they compute what torch
computes (to float32 rounding), a row's result is bit-identical whatever the batch around it, attention writes
each row's new key and value at that row's own position, and the engine and the scheduler use them on CPU float32.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.engine import Engine
from nanochat.exact_decode import ExactDecode, pack_panels, usable
from nanochat.scheduler import Scheduler

from conftest import random_gpt

pytestmark = pytest.mark.skipif(not usable("cpu", torch.float32), reason="rustbpe built without the decode kernels")


def test_pack_panels_pads_the_last_panel_with_zero_columns():
    weight = torch.arange(3 * 20, dtype=torch.float32).view(3, 20)
    panels = pack_panels(weight)
    assert panels.shape == (2, 3, 16)
    assert torch.equal(panels[0], weight[:, :16]) and torch.equal(panels[1, :, :4], weight[:, 16:])
    assert not panels[1, :, 4:].any()


@pytest.mark.parametrize("normalize,relu_squared,residual", [(False, False, False), (True, False, False),
                                                             (False, True, False), (False, False, True)])
def test_linear_computes_what_torch_computes(normalize, relu_squared, residual):
    generator = torch.Generator().manual_seed(0)
    # odd sizes: a partial last panel (45 = 2 x 16 + 13) and rows that do not fill a group of 6
    x = torch.randn(11, 37, generator=generator)
    weight = torch.randn(45, 37, generator=generator).t()  # [K, N] as a transposed view, like the decode tables
    base = torch.randn(11, 45, generator=generator) if residual else None
    got = ExactDecode().linear(x, weight, residual=base, normalize=normalize, relu_squared=relu_squared)
    expected = F.rms_norm(x, (37,), eps=torch.finfo(torch.float32).eps) if normalize else x
    expected = expected.double() @ weight.double() + (0 if base is None else base.double())
    if relu_squared:
        expected = F.relu(expected).square()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_rows_product_is_bit_identical_in_any_batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 256, generator=generator)
    weight = torch.randn(1000, 256, generator=generator).t() * 0.05
    exact = ExactDecode()
    full = exact.linear(x, weight, normalize=True)
    for rows in range(1, 16):
        assert torch.equal(exact.linear(x[:rows], weight, normalize=True), full[:rows]), f"{rows} rows"
    order = torch.randperm(16, generator=generator)
    assert torch.equal(exact.linear(x[order], weight, normalize=True), full[order])


def test_bfloat16_panels_give_the_float32_product_of_the_rounded_weights_in_any_batch():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(9, 64, generator=generator)
    weight = torch.randn(40, 64, generator=generator).t()
    bf16 = ExactDecode(torch.bfloat16)
    got = bf16.linear(x, weight, normalize=True)
    assert bf16.panels(weight)[0].dtype == torch.bfloat16
    assert torch.equal(got, ExactDecode().linear(x, weight.to(torch.bfloat16).float(), normalize=True))
    for rows in (1, 2, 5):
        assert torch.equal(bf16.linear(x[:rows], weight, normalize=True), got[:rows])


def attention_inputs(generator, rows, slots=5, kv_heads=2, heads=4, capacity=32, dim=16):
    """One layer's cache (keys, values) and a qkv matmul output: each row's q, k, v heads side by side."""
    cache = torch.randn(2, slots, kv_heads, capacity, dim, generator=generator)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=generator)
    return cache, qkv, heads


def split_heads(qkv, heads, kv_heads, dim):
    rows = qkv.size(0)
    return (qkv[:, :heads * dim].view(rows, heads, dim), qkv[:, heads * dim:(heads + kv_heads) * dim].view(rows, kv_heads, dim),
            qkv[:, (heads + kv_heads) * dim:].view(rows, kv_heads, dim))


def test_attention_writes_each_rows_key_at_its_position_and_matches_sdpa():
    generator = torch.Generator().manual_seed(2)
    cache, qkv, heads = attention_inputs(generator, rows=3)
    kv_heads, dim = cache.size(2), cache.size(4)
    q, k, v = split_heads(qkv, heads, kv_heads, dim)
    slots, positions = [3, 0, 4], [7, 0, 20]
    before = cache.clone()
    out = ExactDecode().attend(cache[0], cache[1], slots, positions, qkv, heads)
    for row, (slot, position) in enumerate(zip(slots, positions)):
        assert torch.equal(cache[0, slot, :, position], k[row]) and torch.equal(cache[1, slot, :, position], v[row])
        keys, values = cache[0, slot, :, :position + 1], cache[1, slot, :, :position + 1]
        expected = F.scaled_dot_product_attention(q[row].unsqueeze(1), keys.repeat_interleave(2, 0),
                                                  values.repeat_interleave(2, 0)).squeeze(1)
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-5)
    written = torch.zeros_like(cache, dtype=torch.bool)
    for slot, position in zip(slots, positions):
        written[:, slot, :, position] = True
    assert torch.equal(cache[~written], before[~written])  # nothing else in the cache moved


def test_attention_applies_rotary_and_qk_norm_as_the_model_does():
    generator = torch.Generator().manual_seed(3)
    cache, qkv, heads = attention_inputs(generator, rows=2)
    kv_heads, dim = cache.size(2), cache.size(4)
    angles = torch.rand(32, dim // 2, generator=generator) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin(), -angles.sin()], -1)  # GPT._decode_tables' form
    slots, positions = [1, 2], [4, 9]
    q, k, v = split_heads(qkv, heads, kv_heads, dim)
    index = torch.tensor(positions)

    def rotate_and_norm(x):  # what GPT._decode_attention does in torch
        swapped = x.view(x.size(0), x.size(1), 2, dim // 2).flip(2).view_as(x)
        return F.rms_norm(x * cos[index, None] + swapped * sin[index, None], (dim,), eps=torch.finfo(torch.float32).eps)

    prepared = torch.cat([rotate_and_norm(q), rotate_and_norm(k), v], 1).view(2, -1)
    plain_cache = cache.clone()
    expected = ExactDecode().attend(plain_cache[0], plain_cache[1], slots, positions, prepared, heads)
    got = ExactDecode().attend(cache[0], cache[1], slots, positions, qkv, heads, rotary=(cos, sin))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, plain_cache, rtol=1e-5, atol=1e-6)  # the rotated, normed keys were cached


def test_attention_of_a_row_is_bit_identical_alone_and_in_a_batch():
    generator = torch.Generator().manual_seed(4)
    cache, qkv, heads = attention_inputs(generator, rows=4, capacity=64, dim=128)
    tables = (torch.randn(64, 128, generator=generator), torch.randn(64, 128, generator=generator))
    slots, positions = [0, 1, 2, 4], [5, 40, 63, 17]
    exact = ExactDecode()
    together = exact.attend(cache[0], cache[1], slots, positions, qkv, heads, rotary=tables)
    for row in range(4):
        alone = exact.attend(cache[0], cache[1], slots[row:row + 1], positions[row:row + 1], qkv[row:row + 1], heads,
                             rotary=tables)
        assert torch.equal(alone[0], together[row])
    assert math.isfinite(together.sum().item())


def test_attention_refuses_a_position_past_the_cache():
    generator = torch.Generator().manual_seed(5)
    cache, qkv, heads = attention_inputs(generator, rows=1)
    with pytest.raises(ValueError, match="positions"):
        ExactDecode().attend(cache[0], cache[1], [0], [cache.size(3)], qkv, heads)


def test_the_engine_and_the_scheduler_use_the_kernels_on_cpu_float32_only(tiny_tokenizer):
    model = random_gpt(tiny_tokenizer, n_layer=1)
    engine = Engine(model, tiny_tokenizer)
    assert engine._new_cache(1, 8).kernels is engine.exact
    replica = Scheduler([engine], max_batch=4, queue_size=0).replicas[0]
    assert replica.cache.kernels is engine.exact and replica.padded_rows(3) == 3  # one packed copy; no padding needed
    bf16_engine = Engine(random_gpt(tiny_tokenizer, n_layer=1).to(torch.bfloat16), tiny_tokenizer)
    assert bf16_engine._new_cache(1, 8).kernels is None
    bf16_replica = Scheduler([bf16_engine], max_batch=4, queue_size=0).replicas[0]
    assert bf16_replica.cache.kernels is None and bf16_replica.padded_rows(3) == 4  # the torch path pads


def test_a_decode_step_through_the_kernels_matches_the_full_forward(tiny_tokenizer):
    model = random_gpt(tiny_tokenizer, n_layer=2, n_kv_head=2)  # GQA too
    engine = Engine(model, tiny_tokenizer)
    tokens = tiny_tokenizer.encode("The sea is wide and the wind is cold.")
    with torch.inference_mode():
        _, prompt_cache = engine.prefill(tokens[:-3])
        cache = engine._new_cache(1, len(tokens))
        cache.prefill(prompt_cache)
        steps = [model.forward(torch.tensor([[token]]), kv_cache=cache)[0, -1] for token in tokens[-3:]]
        full = model.forward(torch.tensor([tokens]))[0, -3:]
    assert cache.kernels is not None
    torch.testing.assert_close(torch.stack(steps), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_kv_head,tricks", [(4, {}), (1, dict(x0_mixing=True, value_embeds=True))])
def test_the_one_call_step_computes_the_torch_decode_step(tiny_tokenizer, n_kv_head, tricks):
    # GPT.decode_step runs the whole step in rustbpe.DecodeModel when the cache has kernels; the torch loop is
    # the reference. Three rows, x0 mixing, value embeddings and grouped-query attention all go through it.
    import dataclasses
    from nanochat.gpt import GPT
    base = random_gpt(tiny_tokenizer, n_layer=3, n_head=4, n_kv_head=n_kv_head)
    model = GPT(dataclasses.replace(base.config, **tricks))
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambdas" in name or "value_embeds" in name:
                p.normal_(0, 0.5)  # away from their (1, 0, 0) start, so the kernel's mixing is exercised
    engine = Engine(model, tiny_tokenizer)
    tokens = tiny_tokenizer.encode("The sea is wide and the wind is cold.")
    with torch.inference_mode():
        _, prompt_cache = engine.prefill(tokens)
        kernel_cache, torch_cache = engine._new_cache(3, len(tokens) + 3), engine._new_cache(3, len(tokens) + 3)
        torch_cache.kernels = None
        for cache in (kernel_cache, torch_cache):
            cache.prefill(prompt_cache)
        for step in range(3):
            ids = torch.tensor([[tokens[step]], [tokens[-1 - step]], [7 + step]])
            torch.testing.assert_close(model.decode_step(ids, kernel_cache), model.decode_step(ids, torch_cache),
                                       rtol=1e-4, atol=1e-4)
    assert kernel_cache.kernels is not None and kernel_cache.get_pos() == torch_cache.get_pos() == len(tokens) + 3
    torch.testing.assert_close(kernel_cache.cache, torch_cache.cache, rtol=1e-4, atol=1e-5)


def test_the_one_call_step_with_bfloat16_panels_is_the_float32_step_of_the_rounded_weights(tiny_tokenizer):
    # bf16 panels widen exactly to the bf16-rounded weights: the whole step must give the same bits as float32
    # panels of a model whose matrices were rounded first (the embedding and value tables stay float32 in both)
    import copy
    model = random_gpt(tiny_tokenizer, n_layer=2, n_kv_head=2)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() == 2 and "wte" not in name:
                p.copy_(p.to(torch.bfloat16).float())
    tokens, slots, positions = torch.tensor([3, 9, 4]), [0, 1, 1], [0, 0, 1]
    results = []
    for exact, net in ((ExactDecode(torch.bfloat16), model), (ExactDecode(), rounded)):
        cache = torch.zeros(2, 2, 2, 2, 8, 16)
        results.append((exact.step(net._decode_tables(Engine(net, tiny_tokenizer)._new_cache(1, 8)), tokens, cache,
                                   slots, positions), cache))
    (bf16_logits, bf16_cache), (rounded_logits, rounded_cache) = results
    assert torch.equal(bf16_logits, rounded_logits) and torch.equal(bf16_cache, rounded_cache)
    assert bf16_cache[:, :, 1, :, :2].abs().sum() > 0 and not bf16_cache[:, :, 0, :, 1:].any()  # keys where rows put them


def test_the_one_call_step_refuses_a_cache_of_another_shape(tiny_tokenizer):
    model = random_gpt(tiny_tokenizer, n_layer=2)
    tables = model._decode_tables(engine_cache := Engine(model, tiny_tokenizer)._new_cache(1, 8))
    exact = engine_cache.kernels
    wrong = torch.zeros(2, 2, 1, 2, 8, 16)  # 2 kv heads, where the model has 4: the kernel would read past it
    with pytest.raises(AssertionError, match="kv heads"):
        exact.step(tables, torch.tensor([1]), wrong, [0], [0])
    right = torch.zeros(2, 2, 1, 4, 8, 16)
    with pytest.raises(ValueError, match="position past the cache"):
        exact.step(tables, torch.tensor([1]), right, [0], [8])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        exact.step(tables, torch.tensor([tiny_tokenizer.get_vocab_size()]), right, [0], [0])


def test_a_short_prompt_prefilled_as_one_kernel_step_matches_the_model_prefill(tiny_tokenizer):
    # the scheduler prefills short prompts as one step whose rows are the prompt's tokens in one slot
    model = random_gpt(tiny_tokenizer, n_layer=2, n_kv_head=2)
    engine = Engine(model, tiny_tokenizer)
    replica = Scheduler([engine], max_batch=2, queue_size=0).replicas[0]
    prompt = tiny_tokenizer.render_for_completion([{"role": "user", "content": "Tell me about the sea."}])
    with torch.inference_mode():
        expected_logits, prompt_cache = engine.prefill(prompt)
        replica.cache.reserve(len(prompt) + 4, next(model.parameters()))
        logits = replica.prefill_as_step(1, prompt)
    assert replica.cache.lengths == [0, len(prompt)]
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(replica.cache.cache[:, :, 1, :, :len(prompt)], prompt_cache.cache[:, :, 0, :, :len(prompt)],
                               rtol=1e-4, atol=1e-5)
    assert not replica.cache.cache[:, :, 0].any()  # the other slot untouched


def test_packed_weights_live_as_long_as_their_weight_view():
    # 81 weight matrices at depth 20: the cache must hold them all, and drop a model state's copies with it
    exact = ExactDecode()
    views = [torch.randn(8, 16).t() for _ in range(100)]
    first = [exact.panels(view)[0] for view in views]
    assert all(exact.panels(view)[0] is panels for view, panels in zip(views, first))  # packed once each
    del views, first
    assert not exact.packed
