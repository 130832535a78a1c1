"""
nanochat/cpu_autograd.py: the hand-written backwards compute the plain ops' maths, one by one and plugged into a
whole model (loss and every gradient), and the model trains without them.
"""
import pytest
import torch
import torch.nn.functional as F

from nanochat.cpu_autograd import CPU_TRAINING_OPS, ReluSquared, RMSNorm, Rotary, SoftcapCrossEntropy
from nanochat.gpt import LOGIT_SOFTCAP, PLAIN_OPS
from test_gpt import make_model


def test_hand_written_pieces_match_autograd_reference():
    """Each hand-written backward (chunked soft-capped loss, RMSNorm, rotary, relu^2) gives the plain formula's values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(300, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 32, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (300,))
    targets[::7] = -1
    loss = SoftcapCrossEntropy.apply(x, weight, targets, torch.float64, "mean", 64)  # 64-row chunks: several, the last one partial
    loss.backward()
    ours = (loss.detach(), x.grad.clone(), weight.grad.clone())
    x.grad, weight.grad = None, None
    logits = LOGIT_SOFTCAP * torch.tanh(x @ weight.t() / LOGIT_SOFTCAP)
    reference = F.cross_entropy(logits, targets, ignore_index=-1)
    reference.backward()
    for a, b in zip(ours, (reference.detach(), x.grad, weight.grad)):
        torch.testing.assert_close(a, b)
    # reduction="sum" (train_step normalises over the whole step itself): count times the mean, gradients too
    count = (targets != -1).sum().item()
    x.grad, weight.grad = None, None
    total = SoftcapCrossEntropy.apply(x, weight, targets, torch.float64, "sum", 64)
    total.backward()
    for a, b in zip((total.detach(), x.grad, weight.grad), ours):
        torch.testing.assert_close(a, b * count)
    y = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(RMSNorm.apply, (y,))
    torch.testing.assert_close(RMSNorm.apply(y), F.rms_norm(y, (8,)))
    cos, sin = torch.randn(1, 5, 1, 4, dtype=torch.float64), torch.randn(1, 5, 1, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: Rotary.apply(t, cos, sin), (y,))
    assert torch.autograd.gradcheck(ReluSquared.apply, (y,))


def test_bf16_loss_head_matches_the_autocast_formula():
    """With bf16 compute (AMX CPUs), the chunked loss head gives what autocast gives the plain formula: bf16 matmuls, fp32 softmax."""
    torch.manual_seed(0)
    x = torch.randn(300, 64, requires_grad=True)
    weight = (torch.randn(50, 64) / 8).requires_grad_()
    targets = torch.randint(0, 50, (300,))
    targets[::5] = -1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SoftcapCrossEntropy.apply(x, weight, targets, torch.bfloat16, "mean", 64)
        logits = LOGIT_SOFTCAP * torch.tanh((x @ weight.t()).float() / LOGIT_SOFTCAP)
        reference = F.cross_entropy(logits, targets, ignore_index=-1)
    assert loss.dtype == torch.float32
    ours_grads = torch.autograd.grad(loss, (x, weight))
    reference_grads = torch.autograd.grad(reference, (x, weight))
    torch.testing.assert_close(loss, reference, rtol=1e-3, atol=1e-3)
    for ours, ref in zip(ours_grads, reference_grads):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-4)
    # and bf16 really was used: the fp32 loss differs by more than fp32 noise
    fp32 = F.cross_entropy(LOGIT_SOFTCAP * torch.tanh(x @ weight.t() / LOGIT_SOFTCAP), targets, ignore_index=-1)
    assert abs(fp32.item() - loss.item()) > 1e-6


@pytest.mark.parametrize("tricks", [{}, dict(x0_mixing=True, value_embeds=True)])
def test_a_model_on_the_cpu_ops_computes_the_plain_models_loss_and_gradients(tricks):
    model = make_model(depth=2, n_kv_head=1, random_outputs=True, **tricks)
    idx = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, ::5] = -1
    results = {}
    for name, ops in (("plain", PLAIN_OPS), ("cpu", CPU_TRAINING_OPS)):
        model.use_ops(ops)
        loss = model(idx, targets, loss_reduction="sum")
        results[name] = (loss.detach(), torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(results["cpu"][0], results["plain"][0], rtol=1e-5, atol=1e-4)
    for cpu_grad, plain_grad in zip(results["cpu"][1], results["plain"][1]):
        torch.testing.assert_close(cpu_grad, plain_grad, rtol=1e-4, atol=1e-5)
    # without a graph to build (eval, RL's per-token losses) the CPU ops hand over to the plain ones: same bits
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets, loss_reduction="none"), model.use_ops(PLAIN_OPS)(idx, targets, loss_reduction="none"),
                                   rtol=0, atol=0)
