"""Every public op x every backend that runs here, against the dense float64 reference.

Triton runs under the interpreter on CPU (slow: its cases stay small) and KeOps compiles each
(C, D) bucket once (slow on a cold cache: its cases use three fixed (C, D) pairs).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference

# (B, N, M, C, D): irregular sizes 1, 7, 130, 1031; N != M; B in {1, 3}; C in {3, 33, 256}; D in {1, 3, 17}.
FULL_GRID = [
    (1, 1, 7, 3, 1),
    (3, 7, 130, 33, 3),
    (1, 130, 1031, 256, 17),
    (3, 1031, 7, 3, 17),
    (1, 1031, 1031, 33, 1),
    (3, 130, 1, 256, 3),
    (2, 7, 7, 256, 1),
]
# The interpreter runs ~5 ms per 64^3 tile: keep N * M * C small.
TRITON_GRID = [
    (1, 1, 7, 3, 1),
    (3, 7, 130, 33, 3),
    (1, 130, 67, 256, 17),
    (3, 130, 1, 3, 17),
    (2, 7, 7, 256, 1),
]
# KeOps compiles one module per formula, dtype and (C, D) bucket: three fixed pairs.
KEOPS_GRID = [
    (1, 7, 130, 3, 3),
    (3, 130, 7, 33, 17),
    (1, 1031, 130, 256, 1),
]
GRIDS = {"chunked": FULL_GRID, "triton": TRITON_GRID, "keops": KEOPS_GRID}
CASES = [pytest.param(b, shape, id=f"{b}-{'x'.join(map(str, shape))}") for b, grid in GRIDS.items() for shape in grid]

TAU = 0.07  # logits up to 1/tau on unit-norm features


def _inputs(B, N, M, C, D, *, masked=True):
    q = F.normalize(torch.randn(B, N, C), dim=-1)
    k = F.normalize(torch.randn(B, M, C), dim=-1)
    v = torch.randn(B, M, D)
    bias = torch.randn(B, M)
    if masked and M > 1:
        bias[:, 0] = -math.inf  # a masked key
    return q, k, v, bias


def _grads(fn, tensors):
    """Run fn on fresh leaf copies; return (output, grads) for a fixed random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(1)
    upstream = torch.randn(out.shape, generator=gen).to(out.dtype)  # same values in fp32 and fp64
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], upstream, allow_unused=True)
    return out.detach(), grads


def _max_err(a, ref):
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def _check(backend, fn, tensors, *, cancellation_floor=0.0):
    """The op in fp32 on `backend` against the float64 dense reference, forward and gradients.

    Rule (flash-attention's): the backend's error against the float64 oracle is at most twice
    that of the dense torch reference run in fp32 on the same inputs, plus a floor of 1e-5 times
    the problem's magnitude (the largest reference output or gradient entry of the op), or
    `cancellation_floor` where a gradient is a sum of large terms that cancel. Sums over
    ~1000 keys with logits up to 1/tau make fp32 errors data dependent, so a fixed rtol would
    either be loose or fail on the reference itself; the floor covers gradients that are exactly 0
    in dense torch by luck of rounding (e.g. dq with a single key: P (dP - delta) cancels terms of
    the size of the other gradients).
    """
    out, grads = _grads(lambda *t: fn(*t, backend), tensors)
    naive_out, naive_grads = _grads(lambda *t: fn(*t, "torch"), tensors)
    doubles = [t.double() if t.is_floating_point() else t for t in tensors]
    ref_out, ref_grads = _grads(lambda *t: fn(*t, "torch"), doubles)
    assert out.shape == ref_out.shape and out.dtype == naive_out.dtype
    magnitude = max([ref_out.abs().max().item() if ref_out.numel() else 0.0]
                    + [g.abs().max().item() for g in ref_grads if g is not None and g.numel()] + [1.0])
    floor = max(1e-5 * magnitude, cancellation_floor)
    for name, got, naive, ref in [("output", out, naive_out, ref_out)] + [
            (f"grad {i}", g, n, r) for i, (g, n, r) in enumerate(zip(grads, naive_grads, ref_grads))]:
        if ref is None:
            assert got is None or torch.all(got == 0), name
            continue
        assert got is not None, f"{name}: no gradient"
        err, naive_err = _max_err(got, ref), _max_err(naive, ref)
        assert err <= 2 * naive_err + floor, f"{name}: error {err:.3g} vs dense fp32 torch {naive_err:.3g}"


@pytest.mark.parametrize("backend,shape", CASES)
def test_softmax_lse(backend, shape):
    q, k, v, bias = _inputs(*shape)
    _check(backend, lambda q, k, b, be: kernels.softmax_lse(q, k, scale=1 / TAU, bias=b, backend=be), [q, k, bias])


@pytest.mark.parametrize("backend,shape", CASES)
def test_softmax_attend(backend, shape):
    q, k, v, bias = _inputs(*shape)
    _check(backend, lambda q, k, v, b, be: kernels.softmax_attend(q, k, v, scale=1 / TAU, bias=b, backend=be),
           [q, k, v, bias])


@pytest.mark.parametrize("backend,shape", CASES)
def test_softmax_argmax(backend, shape):
    q, k, v, bias = _inputs(*shape)
    idx = kernels.softmax_argmax(q, k, scale=1 / TAU, bias=bias, backend=backend)
    assert idx.dtype == torch.int64 and idx.shape == q.shape[:2]
    # Exact ties are measure-zero, but near-ties may resolve differently in fp32: check that the
    # chosen key's score is the maximum, in float64.
    S = reference.scores(q.double(), k.double(), 1 / TAU, bias.double())
    chosen = S.gather(2, idx.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(chosen, S.amax(-1), rtol=0, atol=1e-4)
    assert not torch.isinf(chosen).any(), "a masked key was chosen"


@pytest.mark.parametrize("backend,shape", CASES)
def test_sinkhorn(backend, shape):
    q, k, v, _ = _inputs(*shape)
    _check(backend, lambda q, k, v, be: kernels.sinkhorn_correspondence(q, k, v, eps=0.05, iters=3, backend=be),
           [q, k, v])


@pytest.mark.parametrize("backend,shape", CASES)
def test_info_nce(backend, shape):
    B, N, M, C, _ = shape
    q, k, _, _ = _inputs(*shape)
    pos = torch.randint(0, M, (B, N))
    # dk_j sums N terms of size |q_i| / tau that cancel exactly when M = 1 (the only key is every
    # anchor's positive): fp32 noise is then about the unit roundoff times their sum, N / tau.
    _check(backend, lambda q, k, be: kernels.info_nce(q, k, pos=pos, tau=TAU, reduction="none", backend=be), [q, k],
           cancellation_floor=1.2e-7 * N / TAU)


@pytest.mark.parametrize("backend", ["chunked", "triton", "keops"])
def test_info_nce_diagonal_positive(backend):
    q, k, _, _ = _inputs(2, 130, 130, 33, 1)
    _check(backend, lambda q, k, be: kernels.info_nce(q, k, tau=TAU, backend=be), [q, k])


POINT_SHAPES = [(1, 1, 7), (3, 7, 130), (1, 1031, 130), (2, 130, 1031)]
POINT_BACKENDS = ["chunked", "kdtree", "keops", "triton"]


@pytest.mark.parametrize("backend", POINT_BACKENDS)
@pytest.mark.parametrize("shape", POINT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_nearest_and_chamfer(backend, shape):
    B, N, M = shape
    x, y = torch.rand(B, N, 3), torch.rand(B, M, 3)
    d2, idx = kernels.nearest(x, y, backend=backend)
    full = ((x.double().unsqueeze(2) - y.double().unsqueeze(1)) ** 2).sum(-1)  # (B, N, M)
    torch.testing.assert_close(d2.double(), full.amin(-1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(full.gather(2, idx.unsqueeze(-1)).squeeze(-1), full.amin(-1), rtol=1e-5, atol=1e-7)
    _check(backend, lambda x, y, be: kernels.chamfer(x, y, reduction="none", backend=be), [x, y])


def test_reference_matches_explicit_formulas():
    """The dense oracle itself, in float64, against the textbook exp/sum forms (small logits)."""
    q, k, v, bias = (t.double() for t in _inputs(2, 9, 13, 4, 3, masked=False))
    S = torch.einsum("bnc,bmc->bnm", q, k) * 3.0 + bias[:, None, :]
    E = torch.exp(S)
    torch.testing.assert_close(reference.lse(q, k, 3.0, bias), torch.log(E.sum(-1)))
    expected = torch.einsum("bnm,bmd->bnd", E / E.sum(-1, keepdim=True), v)
    torch.testing.assert_close(reference.attend(q, k, v, 3.0, bias), expected)
    x, y = torch.rand(2, 9, 3, dtype=torch.float64), torch.rand(2, 13, 3, dtype=torch.float64)
    d = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    loss = kernels.info_nce(q, k[:, :9], tau=0.5, reduction="none", backend="torch")
    logits = torch.einsum("bnc,bmc->bnm", q, k[:, :9]) / 0.5
    torch.testing.assert_close(loss, -torch.log_softmax(logits, -1).diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(kernels.chamfer(x, y, reduction="none", backend="torch"),
                               d.amin(2).mean(1) + d.amin(1).mean(1))


def test_pmd_matches_definition():
    x, y = torch.randn(3, 50, 3), torch.randn(3, 50, 3)
    expected = ((x - y) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(kernels.pmd(x, y, reduction="none"), expected)
    torch.testing.assert_close(kernels.pmd(x, y), expected.mean())
    torch.testing.assert_close(kernels.pmd(x[0], y[0]), expected[0])


def test_unbatched_inputs_drop_the_batch_dim():
    q, k, v, bias = _inputs(1, 9, 11, 5, 2)
    out = kernels.softmax_attend(q[0], k[0], v[0], bias=bias[0], backend="chunked")
    assert out.shape == (9, 2)
    torch.testing.assert_close(out, kernels.softmax_attend(q, k, v, bias=bias, backend="torch")[0])
    assert kernels.softmax_lse(q[0], k[0]).shape == (9,)
    d2, idx = kernels.nearest(torch.rand(9, 3), torch.rand(4, 3))
    assert d2.shape == idx.shape == (9,)


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_non_contiguous_inputs(backend):
    q, k, v, bias = _inputs(2, 20, 30, 8, 3)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    kt = k[:, :, :].transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous() and not kt.is_contiguous()
    torch.testing.assert_close(kernels.softmax_attend(qt, kt, v, bias=bias, backend=backend),
                               reference.attend(q, k, v, 1.0, bias))


def test_large_logits_do_not_overflow():
    q, k, v, _ = _inputs(1, 50, 60, 16, 3, masked=False)
    for backend in ["torch", "chunked"]:
        out = kernels.softmax_attend(q, k, v, scale=100.0, backend=backend)  # tau = 0.01
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, reference.attend(q.double(), k.double(), v.double(), 100.0).float())


@pytest.mark.parametrize("backend", ["chunked"])
def test_gradcheck_float64(backend):
    q, k, v, bias = (t.double().requires_grad_() for t in _inputs(2, 5, 6, 4, 3))
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: kernels.softmax_attend(q, k, v, scale=2.0, bias=b, backend=backend), (q, k, v, bias))
    assert torch.autograd.gradcheck(
        lambda q, k, b: kernels.softmax_lse(q, k, scale=2.0, bias=b, backend=backend), (q, k, bias))


def _multiplicative_sinkhorn(q, k, x, eps, iters):
    """Textbook Sinkhorn with explicit kernel matrix K (float64): b = nu / K^T a, a = mu / K b."""
    C = torch.bmm(q, k.transpose(1, 2))
    K = torch.exp((C - 1) / eps)
    B, N, M = C.shape
    mu, nu = torch.full((B, N), 1 / N, dtype=q.dtype), torch.full((B, M), 1 / M, dtype=q.dtype)
    a = mu.clone()
    for _ in range(iters):
        b = nu / torch.bmm(K.transpose(1, 2), a.unsqueeze(-1)).squeeze(-1)
        a = mu / torch.bmm(K, b.unsqueeze(-1)).squeeze(-1)
    plan = a.unsqueeze(2) * K * b.unsqueeze(1)
    return torch.bmm(plan / plan.sum(-1, keepdim=True), x)


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_sinkhorn_log_domain_equals_multiplicative_form(backend):
    q, k, x, _ = (t.double() for t in _inputs(2, 40, 53, 16, 3))
    for eps, iters in [(0.03, 5), (0.1, 20)]:
        expected = _multiplicative_sinkhorn(q, k, x, eps, iters)
        got = kernels.sinkhorn_correspondence(q, k, x, eps=eps, iters=iters, backend=backend)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_sinkhorn_bias_gives_hard_matching_of_the_plan():
    q, k, x, _ = (t.double() for t in _inputs(1, 30, 40, 8, 3))
    warped, log_b = kernels.sinkhorn_correspondence(q, k, x, eps=0.03, iters=5, return_bias=True)
    assert log_b.shape == (1, 40)
    plan_rows = torch.softmax(reference.scores(q, k, 1 / 0.03, log_b), dim=-1)
    torch.testing.assert_close(warped, torch.bmm(plan_rows, x))
    idx = kernels.softmax_argmax(q, k, scale=1 / 0.03, bias=log_b)
    assert torch.equal(idx, plan_rows.argmax(-1))


def test_sinkhorn_marginals_converge():
    """After many iterations the plan's column sums approach nu = 1/M."""
    q, k, x, _ = (t.double() for t in _inputs(1, 64, 48, 8, 3))
    _, log_b = kernels.sinkhorn_correspondence(q, k, x, eps=0.1, iters=200, return_bias=True, backend="chunked")
    S = reference.scores(q, k, 10.0, log_b)
    log_a = -math.log(64) - torch.logsumexp(S, -1)
    cols = torch.exp(S + log_a.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(cols, torch.full_like(cols, 1 / 48), rtol=1e-6, atol=0)


def test_available_backends_reports_every_backend():
    status = kernels.available_backends()
    assert set(status) == {"torch", "chunked", "keops", "triton", "kdtree"}
    assert status["torch"].startswith("ok:") and status["chunked"].startswith("ok:")
    assert all(s.startswith(("ok:", "unavailable:")) for s in status.values())
