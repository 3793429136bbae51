"""KeOps backend specifics: masks, bias gradients, large logits, 16-bit upcast, batching, padding
buckets, ragged nearest neighbours.

The cross-backend grid lives in test_kernels.py. KeOps compiles one module per formula, dtype and
padded width on first use, so these cases reuse that grid's buckets: C in {3, 33, 256} (padded to
4, 64, 256) and D in {1, 3, 17} (value buckets 4, 4, 32). Only the float64 gradcheck adds modules
(two, at the smallest bucket).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference

if not kernels.available_backends()["keops"].startswith("ok:"):
    pytest.skip(kernels.available_backends()["keops"], allow_module_level=True)

from kernels import _keops_nearest, _keops_softmax  # noqa: E402  (imports pykeops)


def _inputs(B, N, M, C, D, *, dtype=torch.float32):
    q = F.normalize(torch.randn(B, N, C, dtype=torch.float64), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, M, C, dtype=torch.float64), dim=-1).to(dtype)
    v = torch.randn(B, M, D, dtype=dtype)
    bias = torch.randn(B, M, dtype=dtype)
    return q, k, v, bias


def _run(fn, tensors, upstream=None):
    """fn on fresh leaves: (output, grads of <output, upstream>) with a fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    if upstream is None:
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    return out.detach(), grads


def _assert_close_to_reference(keops_fn, ref_fn, tensors):
    """KeOps in fp32 against the dense float64 oracle: error at most twice dense fp32 torch's
    (plus 1e-5 of the largest reference value), for the output and every gradient."""
    out, grads = _run(keops_fn, tensors)
    naive, naive_grads = _run(ref_fn, tensors)
    ref, ref_grads = _run(ref_fn, [t.double() for t in tensors])
    assert out.dtype == tensors[0].dtype and out.shape == ref.shape
    floor = 1e-5 * max([ref.abs().max().item(), 1.0] + [g.abs().max().item() for g in ref_grads])
    for name, got, dense, exact in zip(["output"] + [f"grad {i}" for i in range(len(grads))],
                                       [out, *grads], [naive, *naive_grads], [ref, *ref_grads]):
        err = (got.double() - exact).abs().max().item()
        dense_err = (dense.double() - exact).abs().max().item()
        assert err <= 2 * dense_err + floor, f"{name}: error {err:.3g} vs dense fp32 {dense_err:.3g}"


def test_buckets():
    """C and D + 1 share padded widths; the lead's grid maps to C buckets {4, 64, 256} and value
    buckets {4, 32}."""
    assert [_keops_softmax._bucket(n) for n in (1, 3, 4, 5, 16, 17, 33, 64, 65, 129, 256, 257)] == \
        [4, 4, 4, 8, 16, 32, 64, 64, 128, 192, 256, 320]
    assert [_keops_softmax._bucket(d + 1) for d in (1, 3, 17)] == [4, 4, 32]


@pytest.mark.parametrize("C,D", [(3, 3), (33, 17), (256, 1)])
def test_padding_buckets_match_the_unpadded_reference(C, D):
    """C = 3 / 33 run padded to 4 / 64, C = 256 fills its bucket (its key gradient [s q, 1] takes two
    passes); D = 17 pads the value factors to 32. B = 3 with N != M."""
    q, k, v, bias = _inputs(3, 37, 21, C, D)
    scale = 1 / 0.07
    _assert_close_to_reference(lambda q, k, v, b: _keops_softmax.attend(q, k, v, scale, b),
                               lambda q, k, v, b: reference.attend(q, k, v, scale, b), [q, k, v, bias])
    _assert_close_to_reference(lambda q, k, b: _keops_softmax.lse(q, k, scale, b),
                               lambda q, k, b: reference.lse(q, k, scale, b), [q, k, bias])


def test_masked_keys_get_zero_weight_and_zero_gradient():
    q, k, v, bias = _inputs(2, 19, 11, 3, 3)
    masked = torch.zeros(2, 11, dtype=torch.bool)
    masked[0, [0, 4, 10]] = True
    masked[1, :10] = True  # a single unmasked key: every query must pick it
    bias[masked] = -math.inf
    # Masked keys get large values: any weight leaking onto them would show.
    v = torch.where(masked.unsqueeze(-1), torch.full_like(v, 1e6), v)
    scale = 1 / 0.07
    for fn, ref_fn, tensors in [
            (lambda q, k, v, b: _keops_softmax.attend(q, k, v, scale, b),
             lambda q, k, v, b: reference.attend(q, k, v, scale, b), [q, k, v, bias]),
            (lambda q, k, b: _keops_softmax.lse(q, k, scale, b),
             lambda q, k, b: reference.lse(q, k, scale, b), [q, k, bias])]:
        out, grads = _run(fn, tensors)
        ref, ref_grads = _run(ref_fn, [t.double() for t in tensors])
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        dk, dbias = grads[1], grads[-1]
        assert torch.all(dk[masked] == 0) and torch.all(dbias[masked] == 0)
        assert torch.isfinite(dbias).all()
        torch.testing.assert_close(dbias.double(), ref_grads[-1], rtol=1e-5, atol=1e-5)
    attended = _keops_softmax.attend(q, k, v, scale, bias)
    torch.testing.assert_close(attended[1], v[1, 10].expand(19, 3))
    idx = _keops_softmax.argmax(q, k, scale, bias)
    assert not masked.gather(1, idx).any() and torch.all(idx[1] == 10)


def test_bias_gradient_matches_reference_and_none_bias_equals_zeros():
    q, k, v, bias = _inputs(2, 40, 23, 33, 17)
    bias[0, 3] = -math.inf
    scale = 3.0
    # Only the bias requires grad: the key-gradient pass then carries just the ones column.
    b = bias.clone().requires_grad_()
    g = torch.randn(2, 40, 17)
    (dbias,) = torch.autograd.grad(_keops_softmax.attend(q, k, v, scale, b), b, g)
    bd = bias.double().requires_grad_()
    (ref,) = torch.autograd.grad(reference.attend(q.double(), k.double(), v.double(), scale, bd), bd, g.double())
    torch.testing.assert_close(dbias.double(), ref, rtol=1e-5, atol=1e-6)
    assert dbias[0, 3] == 0
    b = bias.clone().requires_grad_()
    (dbias,) = torch.autograd.grad(_keops_softmax.lse(q, k, scale, b), b, g[..., 0])
    (ref,) = torch.autograd.grad(reference.lse(q.double(), k.double(), scale, bd), bd, g[..., 0].double())
    torch.testing.assert_close(dbias.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_keops_softmax.attend(q, k, v, scale, None),
                               _keops_softmax.attend(q, k, v, scale, torch.zeros_like(bias)), rtol=0, atol=0)
    torch.testing.assert_close(_keops_softmax.lse(q, k, scale, None),
                               reference.lse(q, k, scale, None))


def test_large_scale_does_not_overflow():
    """scale 100 (tau = 0.01) on unit-norm features: logits up to 100, exp(100) overflows fp32."""
    q, k, v, bias = _inputs(1, 130, 67, 33, 3)
    q[0, 0] = k[0, 5]  # an exact match: the largest possible logit, 100
    for fn, ref_fn, tensors in [
            (lambda q, k, v, b: _keops_softmax.attend(q, k, v, 100.0, b),
             lambda q, k, v, b: reference.attend(q, k, v, 100.0, b), [q, k, v, bias]),
            (lambda q, k, b: _keops_softmax.lse(q, k, 100.0, b),
             lambda q, k, b: reference.lse(q, k, 100.0, b), [q, k, bias])]:
        out, grads = _run(fn, tensors)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        _assert_close_to_reference(fn, ref_fn, tensors)
    assert _keops_softmax.argmax(q, k, 100.0, torch.zeros_like(bias))[0, 0] == 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs_are_computed_in_float32(dtype):
    """Outputs and gradients come back in the input dtype; their error against the float32 oracle
    (on the same rounded inputs) is at most twice that of dense torch at that precision."""
    q, k, v, bias = _inputs(2, 33, 45, 33, 3, dtype=dtype)
    bias[:, 1] = -math.inf
    for fn, ref_fn, tensors in [
            (lambda q, k, v, b: _keops_softmax.attend(q, k, v, 10.0, b),
             lambda q, k, v, b: reference.attend(q, k, v, 10.0, b), [q, k, v, bias]),
            (lambda q, k, b: _keops_softmax.lse(q, k, 10.0, b),
             lambda q, k, b: reference.lse(q, k, 10.0, b), [q, k, bias])]:
        out, grads = _run(fn, tensors)
        naive, naive_grads = _run(ref_fn, tensors)
        exact, exact_grads = _run(ref_fn, [t.float() for t in tensors])
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
        for got, dense, ref in zip([out, *grads], [naive, *naive_grads], [exact, *exact_grads]):
            err = (got.float() - ref).abs().max().item()
            assert err <= 2 * (dense.float() - ref).abs().max().item() + 1e-6
    idx = _keops_softmax.argmax(q, k, 10.0, bias)
    S = reference.scores(q.float(), k.float(), 10.0, bias.float())
    torch.testing.assert_close(S.gather(2, idx.unsqueeze(-1)).squeeze(-1), S.amax(-1))


def test_batch_elements_are_independent_with_ragged_sizes():
    """B = 3 in one call equals three B = 1 calls, for N != M, N = 1 and M = 1 (a one-row
    i or j variable must not be mistaken for a parameter)."""
    for N, M in [(29, 130), (1, 9), (9, 1)]:
        q, k, v, bias = _inputs(3, N, M, 3, 3)
        batched = _keops_softmax.attend(q, k, v, 5.0, bias)
        singles = torch.cat([_keops_softmax.attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], 5.0, bias[b:b + 1])
                             for b in range(3)])
        torch.testing.assert_close(batched, singles, rtol=0, atol=0)
        torch.testing.assert_close(batched, reference.attend(q, k, v, 5.0, bias))
        torch.testing.assert_close(_keops_softmax.lse(q, k, 5.0, bias), reference.lse(q, k, 5.0, bias))
        assert torch.equal(_keops_softmax.argmax(q, k, 5.0, bias), reference.argmax(q, k, 5.0, bias))


def test_non_contiguous_inputs_through_the_public_ops():
    q, k, v, bias = _inputs(2, 50, 31, 3, 3)
    qt, kt, vt = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v))
    assert not (qt.is_contiguous() or kt.is_contiguous() or vt.is_contiguous())
    torch.testing.assert_close(kernels.softmax_attend(qt, kt, vt, scale=4.0, bias=bias, backend="keops"),
                               reference.attend(q, k, v, 4.0, bias))
    torch.testing.assert_close(kernels.softmax_lse(qt[:, ::2], kt, scale=4.0, bias=bias, backend="keops"),
                               reference.lse(q[:, ::2], k, 4.0, bias))


def test_gradcheck_float64():
    """The custom backward (not KeOps autodiff) in float64, with a masked key; two fp64 modules.
    Tiny sizes: gradcheck makes ~2 KeOps calls per input entry, each with a fixed launch cost."""
    q, k, v, bias = (t.double() for t in _inputs(2, 2, 3, 3, 2))
    bias[1, 2] = -math.inf
    leaves = [t.requires_grad_() for t in (q, k, v, bias)]
    # gradcheck perturbs every entry, including the -inf one (-inf + eps = -inf): fine, its gradient is 0.
    assert torch.autograd.gradcheck(lambda q, k, v, b: _keops_softmax.attend(q, k, v, 2.0, b), leaves)
    assert torch.autograd.gradcheck(lambda q, k, b: _keops_softmax.lse(q, k, 2.0, b), [leaves[0], leaves[1], leaves[3]])


@pytest.mark.parametrize("B,N,M", [(1, 1, 1), (3, 1031, 7), (2, 1, 130), (1, 130, 1031)])
def test_nearest_index_ragged(B, N, M):
    x, y = torch.rand(B, N, 3), torch.rand(B, M, 3)
    idx = _keops_nearest.nearest_index(x, y)
    assert idx.dtype == torch.int64 and idx.shape == (B, N)
    d2 = ((x.double().unsqueeze(2) - y.double().unsqueeze(1)) ** 2).sum(-1)  # (B, N, M)
    torch.testing.assert_close(d2.gather(2, idx.unsqueeze(-1)).squeeze(-1), d2.amin(-1), rtol=1e-6, atol=1e-7)


def test_nearest_direct_differences_far_from_the_origin():
    """Points 1000 units from the origin, 1e-3 apart: the |x|^2 - 2xy + |y|^2 expansion loses
    these distances in fp32; direct differences do not. Also fp16 and non-contiguous inputs."""
    y = torch.rand(1, 200, 3) * 0.1 + 1000.0
    x = (y[:, torch.randperm(200)] + 1e-4 * torch.randn(1, 200, 3)).transpose(1, 2).contiguous().transpose(1, 2)
    d2 = ((x.double().unsqueeze(2) - y.double().unsqueeze(1)) ** 2).sum(-1)
    assert torch.equal(_keops_nearest.nearest_index(x, y), d2.argmin(-1))
    xh, yh = (torch.rand(2, 40, 3) - 0.5).half(), (torch.rand(2, 33, 3) - 0.5).half()
    d2 = ((xh.double().unsqueeze(2) - yh.double().unsqueeze(1)) ** 2).sum(-1)
    idx = kernels.nearest(xh, yh, backend="keops")[1]
    torch.testing.assert_close(d2.gather(2, idx.unsqueeze(-1)).squeeze(-1), d2.amin(-1), rtol=1e-6, atol=0)
