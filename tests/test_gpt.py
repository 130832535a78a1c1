"""The GPT model: sizing, init, loss, the KV-cache path (rows at one position or each at its own) and the naive sampler."""
import dataclasses
import math

import pytest
import torch

from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig, model_config_from_depth


def make_model(depth=2, vocab_size=256, sequence_len=64, n_kv_head=None, seed=0, random_outputs=False, **tricks):
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(model_config_from_depth(depth, vocab_size, sequence_len, n_kv_head), **tricks))
    model.init_weights()
    if random_outputs:  # zero-initialised projections make every position look alike; break that for comparisons
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2 and p.abs().sum() == 0:
                    p.normal_(0, 0.02)
            if model.config.x0_mixing:  # gains away from their (1, 0) start, so both paths matter
                model.resid_lambdas.uniform_(0.5, 1.5)
                model.x0_lambdas.uniform_(0.2, 1.0)
    return model


def test_depth_sets_width_and_heads():
    cfg = model_config_from_depth(20, 32768, 2048)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_layer) == (1280, 10, 10, 20)
    assert model_config_from_depth(12, 100, 16).n_embd == 768
    # tiny depths round up to one full 128-wide head
    assert [model_config_from_depth(d, 100, 16).n_embd for d in (1, 2, 3, 4)] == [128, 128, 256, 256]
    assert model_config_from_depth(20, 100, 16, n_kv_head=5).n_kv_head == 5
    with pytest.raises(ValueError, match="must divide"):
        model_config_from_depth(20, 100, 16, n_kv_head=3)


def test_initial_loss_is_uniform_and_ignores_minus_one():
    model = make_model(vocab_size=300)
    idx = torch.randint(0, 300, (2, 16))
    targets = idx.clone()
    # the head starts at zero, so every token gets probability 1/V
    assert model(idx, targets).item() == pytest.approx(math.log(300), rel=1e-5)
    model = make_model(vocab_size=300, random_outputs=True)
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 16)
    targets[:, :8] = -1
    masked = model(idx, targets)
    assert masked.item() == pytest.approx(per_token[:, 8:].mean().item(), rel=1e-5)
    logits = model(idx)
    assert logits.shape == (2, 16, 300) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # soft-capped


def test_num_params_and_flops():
    model = make_model(depth=2, vocab_size=256, sequence_len=64)
    d = 128
    per_layer = 4 * d * d + 8 * d * d  # q, k, v, proj + 4x MLP in and out
    assert model.num_params() == 2 * per_layer + 2 * 256 * d
    assert model.estimate_flops() == 6 * (2 * per_layer + 256 * d) + 12 * 2 * 1 * 128 * 64


@pytest.mark.slow
def test_overfits_a_single_batch():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = make_model(depth=2, vocab_size=256, sequence_len=32)
    optimizers = model.setup_optimizers()
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (2, 33))
    inputs, targets = idx[:, :-1], idx[:, 1:]
    first = None
    for _ in range(40):
        loss = model(inputs, targets)
        first = first if first is not None else loss.item()
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert first == pytest.approx(math.log(256), rel=1e-4)
    assert loss.item() < 0.5, f"could not memorise one batch: loss {first:.2f} -> {loss.item():.2f}"


@pytest.mark.parametrize("n_kv_head,tricks", [(None, {}), (1, {}), (None, dict(x0_mixing=True, value_embeds=True)),
                                              (1, dict(value_embeds=True))])
def test_kv_cache_matches_full_forward(n_kv_head, tricks):
    model = make_model(depth=4, vocab_size=128, n_kv_head=n_kv_head, random_outputs=True, **tricks)
    model.eval()
    idx = torch.randint(0, 128, (2, 21))
    config = model.config
    cache = KVCache(2, config.n_layer, config.n_kv_head, config.n_embd // config.n_head)

    def step(chunk):
        cache.begin_step([0, 1])
        logits = model(chunk, kv_cache=cache)
        cache.end_step(chunk.size(1))
        return logits

    with torch.no_grad():
        full = model(idx)
        # a prefill, a multi-token chunk after a prefix, then single-token decode steps
        pieces = [step(idx[:, :7]), step(idx[:, 7:15])] + [step(idx[:, t:t + 1]) for t in range(15, 21)]
    assert cache.lengths == [21, 21]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_rows_at_their_own_positions_match_each_alone():
    """Continuous batching: one forward pass feeds rows of different lengths (and padding), each as if alone."""
    model = make_model(depth=2, vocab_size=128, n_kv_head=1, random_outputs=True, value_embeds=True)
    model.eval()
    config = model.config
    sequences = [torch.randint(0, 128, (1, n)) for n in (3, 9, 5)]
    cache = KVCache(4, config.n_layer, config.n_kv_head, config.n_embd // config.n_head)
    with torch.no_grad():
        for slot, sequence in zip((3, 0, 2), sequences):  # prompts into slots out of order, each on its own
            cache.begin_step([slot])
            model(sequence[:, :-1], kv_cache=cache)
            cache.end_step(sequence.size(1) - 1)
        cache.begin_step([3, 0, 2], padded_rows=4)  # then one step for all three, at positions 2, 8 and 4
        last = torch.tensor([[s[0, -1].item()] for s in sequences] + [[0]])
        logits = model(last, kv_cache=cache)
        cache.end_step()
        for row, sequence in enumerate(sequences):
            torch.testing.assert_close(logits[row, 0], model(sequence)[0, -1], atol=1e-4, rtol=1e-4)
    assert cache.lengths == [9, 0, 5, 3]


def test_generate_is_greedy_argmax_and_seeded():
    model = make_model(vocab_size=64, random_outputs=True)
    prompt = [1, 2, 3]
    greedy = list(model.generate(prompt, max_tokens=5, temperature=0))
    ids = list(prompt)
    for token in greedy:
        with torch.no_grad():
            assert token == model(torch.tensor([ids]))[0, -1].argmax().item()
        ids.append(token)
    sampled_a = list(model.generate(prompt, max_tokens=8, temperature=1.0, seed=7))
    sampled_b = list(model.generate(prompt, max_tokens=8, temperature=1.0, seed=7))
    assert sampled_a == sampled_b
    top1 = list(model.generate(prompt, max_tokens=5, temperature=1.0, top_k=1))
    assert top1 == greedy


def test_meta_device_build_then_init():
    cfg = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=128)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}  # rotary tables are not saved


def test_training_step_in_bf16_tracks_fp32():
    """A whole forward+backward under CPU bf16 autocast stays close to fp32 (loss and every gradient)."""
    model = make_model(depth=2, random_outputs=True)
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(idx, -1, dims=1)
    fp32_loss = model(idx, targets)
    fp32_grads = torch.autograd.grad(fp32_loss, list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss = model(idx, targets)
    bf16_grads = torch.autograd.grad(bf16_loss, list(model.parameters()))
    assert bf16_loss.dtype == torch.float32 and bf16_loss.item() != fp32_loss.item()
    assert bf16_loss.item() == pytest.approx(fp32_loss.item(), rel=1e-2)
    for name, a, b in zip([n for n, _ in model.named_parameters()], bf16_grads, fp32_grads):
        assert a.dtype == torch.float32, name
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6, name


def test_speedrun_tricks_are_wired_in():
    """x0 mixing and value embeddings: where they sit, which optimizer owns them, that they learn and change the output."""
    plain = make_model(depth=3, random_outputs=True)
    model = make_model(depth=3, random_outputs=True, x0_mixing=True, value_embeds=True)
    assert sorted(model.value_embeds) == ["0", "2"]  # every other layer, the last included
    kv_dim = model.config.n_kv_head * 128
    assert model.num_params() == plain.num_params() + 2 * 3 + 2 * 256 * kv_dim
    assert model.estimate_flops() == plain.estimate_flops()  # lookups and scalar gains cost no matmul FLOPs
    adamw, muon = model.setup_optimizers()
    adam_params = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert {id(model.resid_lambdas), id(model.x0_lambdas)} | {id(e.weight) for e in model.value_embeds.values()} <= adam_params
    assert not adam_params & {id(p) for group in muon.param_groups for p in group["params"]}
    idx = torch.randint(0, 256, (2, 32))
    before = model(idx).detach()
    model(idx, torch.roll(idx, -1, dims=1)).backward()
    assert model.x0_lambdas.grad.abs().min() > 0 and model.value_embeds["2"].weight.grad.abs().sum() > 0
    for opt in (adamw, muon):
        opt.step()
    assert not torch.allclose(model(idx), before)
    with torch.no_grad():
        model.x0_lambdas.zero_()
        for embedding in model.value_embeds.values():
            embedding.weight.zero_()
        model.resid_lambdas.fill_(1.0)
    # with both switched to neutral the model computes what the same weights compute without the tricks
    twin = make_model(depth=3)
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if k in twin.state_dict()})
    torch.testing.assert_close(model(idx), twin(idx))
