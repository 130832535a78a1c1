"""
Muon and AdamW, single process and distributed.

The distributed checks run this file under torchrun (2 ranks, gloo): each rank builds the same
parameters, feeds its own gradients to DistMuon / DistAdamW, and rank 0 compares the result with
Muon / torch.optim.AdamW stepped on the averaged gradients.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat.optim import DistAdamW, DistMuon, Muon, zeropower_via_newtonschulz5

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# three matrices of one shape over two ranks exercises the padded last chunk; odd sizes exercise AdamW's padding
SHAPES = [(48, 32), (48, 32), (48, 32), (32, 96), (5, 7)]


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]


def make_grads(step, rank, seed=100):
    gen = torch.Generator().manual_seed(seed + 10 * step + rank)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 256)])
def test_newton_schulz_is_close_to_orthogonal(shape, dtype):
    # a gradient-like matrix whose singular values spread over two decades (5 quintic steps lift
    # anything above ~1/300 of the Frobenius norm; a random square matrix can have far smaller ones)
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=gen))
    V, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=gen))
    G = U @ torch.diag(torch.logspace(-2, 0, min(shape))) @ V.T * 3.0
    X = zeropower_via_newtonschulz5(G, dtype=dtype)
    assert X.dtype == torch.float32  # returned in the gradient's dtype whatever it ran in
    stacked = zeropower_via_newtonschulz5(torch.stack([G, 2 * G]), dtype=dtype)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(stacked[0], X, atol=tolerance, rtol=tolerance)  # a batch gives each matrix's own result
    torch.testing.assert_close(stacked[1], X, atol=tolerance, rtol=tolerance)  # and the scale of G does not matter
    singular_values = torch.linalg.svdvals(X)
    # the quintic iteration trades exactness for speed: all singular values end up near 1
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cosine = (X * (U @ Vh)).sum() / (X.norm() * (U @ Vh).norm())
    assert cosine > 0.95  # and it points where U V^T points


def test_muon_update_is_orthogonalised_momentum():
    p = torch.nn.Parameter(torch.zeros(32, 32))
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False)
    U, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))
    p.grad = U @ torch.diag(torch.linspace(0.1, 2.0, 32)) @ U.T
    opt.step()
    update = -p.detach() / 0.1
    singular_values = torch.linalg.svdvals(update)
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def run_adamw_pair(steps, world_size_grads):
    """torch.optim.AdamW vs DistAdamW (single process) on the same param groups and averaged grads."""
    ref_params, our_params = make_params(), make_params()
    groups = lambda ps: [dict(params=ps[:3], lr=0.01), dict(params=ps[3:], lr=0.003, weight_decay=0.1)]
    reference = torch.optim.AdamW(groups(ref_params), betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01)
    ours = DistAdamW(groups(our_params), betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01)
    for step in range(steps):
        grads = [torch.stack(g).mean(0) for g in zip(*[make_grads(step, r) for r in range(world_size_grads)])]
        for p, q, g in zip(ref_params, our_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        reference.step()
        ours.step()
    return ref_params, our_params


def test_dist_adamw_single_process_matches_torch_adamw():
    ref_params, our_params = run_adamw_pair(steps=5, world_size_grads=1)
    for p, q in zip(ref_params, our_params):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-6)


def test_dist_muon_single_process_matches_muon():
    ref_params, our_params = make_params(), make_params()
    reference, ours = Muon(ref_params[:4], lr=0.02), DistMuon(our_params[:4], lr=0.02)
    for step in range(3):
        for p, q, g in zip(ref_params[:4], our_params[:4], make_grads(step, 0)):
            p.grad, q.grad = g.clone(), g.clone()
        reference.step()
        ours.step()
    for p, q in zip(ref_params[:4], our_params[:4]):
        torch.testing.assert_close(q, p, atol=0, rtol=0)


@pytest.mark.slow
def test_distributed_optimizers_match_single_process(tmp_path):
    out = tmp_path / "dist.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.abspath(__file__), str(out)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    dist_muon, dist_adamw = torch.load(out)
    # the same steps, one process, on the gradients averaged over the two ranks
    ref_params = make_params()
    muon = Muon(ref_params[:4], lr=0.02)
    adamw = torch.optim.AdamW(ref_params[4:], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01)
    for step in range(3):
        grads = [torch.stack(g).mean(0) for g in zip(*[make_grads(step, r) for r in range(2)])]
        for p, g in zip(ref_params, grads):
            p.grad = g
        muon.step()
        adamw.step()
    for p, q in zip(ref_params[:4], dist_muon):
        torch.testing.assert_close(q, p.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dist_adamw[0], ref_params[4].detach(), atol=1e-6, rtol=1e-6)
    # and the AdamW state really is sharded: 5x7 = 35 numbers padded to 36, 18 moments per rank
    assert json.loads(result.stdout.strip().splitlines()[-1])["adamw_state_sizes"] == [18, 18]


def distributed_worker(out_path):
    """Run by torchrun: 2 ranks step DistMuon/DistAdamW on rank-specific grads for 3 steps."""
    import torch.distributed as dist

    from nanochat.common import compute_cleanup

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    params = make_params()
    muon = DistMuon(params[:4], lr=0.02)
    adamw = DistAdamW(params[4:], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01)
    for step in range(3):
        for p, g in zip(params, make_grads(step, rank)):
            p.grad = g
        muon.step()
        adamw.step()
    state_size = torch.tensor([adamw.state[params[4]]["exp_avg"].numel()])
    sizes = [torch.zeros_like(state_size) for _ in range(2)]
    dist.all_gather(sizes, state_size)
    if rank == 0:
        torch.save(([p.detach() for p in params[:4]], [p.detach() for p in params[4:]]), out_path)
        print(json.dumps({"adamw_state_sizes": [s.item() for s in sizes]}))
    compute_cleanup()


if __name__ == "__main__":
    distributed_worker(sys.argv[1])
