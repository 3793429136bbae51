"""Triton backend specifics: float64 gradcheck, 16-bit inputs, C and D chunking, large logits,
masking, strides, argmax/nearest ties. The cross-backend grid lives in tests/test_kernels.py.

On a CPU-only machine conftest sets TRITON_INTERPRET=1 before imports, so the kernels run in the
interpreter on CPU tensors (slow: sizes stay <= ~300 points). Cases that need real compilation
run only with CUDA and skip otherwise.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _triton_nearest as tn
from kernels import _triton_softmax as ts
from kernels import reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRET), reason="triton needs CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not CUDA or INTERPRET,
                                reason="needs a CUDA device with compiled (not interpreted) kernels")


def _inputs(B, N, M, C, D, *, dtype=torch.float32, masked=(0,), device=DEVICE):
    """Unit-norm q, k; v ~ N(0, 1); bias ~ N(0, 1) with -inf at the `masked` keys."""
    q = F.normalize(torch.randn(B, N, C, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, M, C, dtype=torch.float64), dim=-1)
    v = torch.randn(B, M, D, dtype=torch.float64)
    bias = torch.randn(B, M, dtype=torch.float64)
    for j in masked:
        if j < M:
            bias[:, j] = -math.inf
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, bias)]


def _run(fn, tensors, upstream_seed=1):
    """fn on fresh leaves; returns (output, grads) for a fixed random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(upstream_seed)
    up = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, up)
    return out.detach(), grads


def _attend(impl, scale):
    return lambda q, k, v, b: impl.attend(q, k, v, scale, b)


def _lse(impl, scale):
    return lambda q, k, b: impl.lse(q, k, scale, b)


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def _assert_fp32_matches(fn_triton, fn_ref, tensors):
    """fp32 Triton vs the float64 reference with assert_close's fp32 defaults."""
    out, grads = _run(fn_triton, tensors)
    ref_out, ref_grads = _run(fn_ref, [t.double() for t in tensors])
    assert out.dtype == tensors[0].dtype
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.double(), ref_out, rtol=1.3e-6, atol=1e-5, check_dtype=False)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(g.double(), r, rtol=1.3e-6, atol=1e-5, check_dtype=False,
                                   msg=lambda m, i=i: f"grad {i}: {m}")


# ------------------------------------------------------------------------------------------------
# float64 gradcheck (the custom backward against finite differences of the Triton forward)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 3), (1, 2, 20, 3, 2)], ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_attend(shape):
    q, k, v, bias = _inputs(*shape, dtype=torch.float64, masked=(1,))
    fn = lambda q, k, v, b: ts.attend(q, k, v, 1.7, b)  # noqa: E731
    # bias gradients are checked at the masked entry too (its gradient is 0; finite differences
    # of -inf + h stay -inf, so gradcheck sees 0 as well).
    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (q, k, v, bias)], eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 3, 6, 5), (1, 20, 3, 3)], ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_lse(shape):
    q, k, _, bias = _inputs(*shape, 1, dtype=torch.float64, masked=(2,))
    fn = lambda q, k, b: ts.lse(q, k, 2.3, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (q, k, bias)], eps=1e-6, atol=1e-7)


def test_gradcheck_chunked_paths(monkeypatch):
    """C and D wider than one block: the read-modify-write output buffers (forward O, dq, dk, dv).
    fast_mode checks random projections of the Jacobian (the full one takes minutes here)."""
    monkeypatch.setattr(ts, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(ts, "MAX_BLOCK_D", 16)
    q, k, v, bias = _inputs(1, 3, 18, 37, 20, dtype=torch.float64, masked=(0, 17))
    meta = ts._meta(q, k, v.shape[-1])
    assert not meta["ONE_C"] and not meta["ONE_D"]
    leaves = [t.requires_grad_() for t in (q, k, v, bias)]
    assert torch.autograd.gradcheck(lambda q, k, v, b: ts.attend(q, k, v, 0.9, b), leaves, eps=1e-6, atol=1e-7,
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda q, k, b: ts.lse(q, k, 0.9, b), [leaves[0], leaves[1], leaves[3]],
                                    eps=1e-6, atol=1e-7, fast_mode=True)


def test_gradcheck_without_bias():
    q, k, v, _ = _inputs(1, 4, 9, 5, 2, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q, k, v: ts.attend(q, k, v, 1.3, None), leaves, eps=1e-6, atol=1e-7)


def test_float64_matches_reference_exactly():
    """The fp64 path accumulates in fp64 and the scale keeps ~48 bits (hi/lo pair)."""
    q, k, v, bias = _inputs(2, 33, 70, 20, 3, dtype=torch.float64)
    scale = 1 / 0.07
    out, grads = _run(_attend(ts, scale), [q, k, v, bias])
    ref_out, ref_grads = _run(_attend(reference, scale), [q, k, v, bias])
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# fp32 against the float64 reference: chunking, large logits, masking, strides
# ------------------------------------------------------------------------------------------------
def test_wide_features_and_values():
    """C = 300 > BLOCK_C (3 chunks, ragged last) and D = 130 > BLOCK_D (2 chunks, ragged last)."""
    q, k, v, bias = _inputs(2, 37, 70, 300, 130, masked=(0, 69))
    meta = ts._meta(q, k, v.shape[-1])
    assert not meta["ONE_C"] and not meta["ONE_D"], "the test must exercise the chunked paths"
    _assert_fp32_matches(_attend(ts, 5.0), _attend(reference, 5.0), [q, k, v, bias])
    _assert_fp32_matches(_lse(ts, 5.0), _lse(reference, 5.0), [q, k, bias])


@pytest.mark.parametrize("op", ["lse", "attend"])
def test_scale_100_unit_norm_no_overflow(op):
    """Logits up to 100 (tau = 0.01) on unit-norm features: exp(S) alone would overflow fp32 at 88."""
    q, k, v, bias = _inputs(2, 70, 90, 16, 3)
    k[:, :5] = q[:, :5]  # some exact matches: logits of exactly 100
    scale = 100.0
    if op == "lse":
        fn, ref, t = _lse(ts, scale), _lse(reference, scale), [q, k, bias]
    else:
        fn, ref, t = _attend(ts, scale), _attend(reference, scale), [q, k, v, bias]
    out, grads = _run(fn, t)
    ref_out, ref_grads = _run(ref, [x.double() for x in t])
    assert torch.isfinite(out).all()
    # Inputs are rounded to fp32 and the logits are 100x their dot products, so compare by the
    # flash-attention rule against dense fp32 torch rather than with a fixed tolerance.
    naive_out, naive_grads = _run(ref, t)
    assert _err(out, ref_out) <= 2 * _err(naive_out, ref_out) + 1e-5
    for i, (g, n, r) in enumerate(zip(grads, naive_grads, ref_grads)):
        assert torch.isfinite(g).all(), f"grad {i}"
        assert _err(g, r) <= 2 * _err(n, r) + 1e-5 * (1 + r.abs().max().item()), f"grad {i}"


def test_fully_masked_key_tiles():
    """Every key of the first two 64-wide tiles is masked: the running max stays -inf for those
    tiles and must not produce NaN; masked keys get exactly zero gradient."""
    M = 150
    q, k, v, bias = _inputs(2, 20, M, 8, 3, masked=range(128))
    out, (dq, dk, dv, db) = _run(_attend(ts, 10.0), [q, k, v, bias])
    ref_out, ref_grads = _run(_attend(reference, 10.0), [t.double() for t in (q, k, v, bias)])
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    torch.testing.assert_close(out.double(), ref_out, rtol=1.3e-6, atol=1e-5)
    for g, r in zip((dq, dk, dv, db), ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1.3e-6, atol=1e-5)
    assert (dk[:, :128] == 0).all() and (dv[:, :128] == 0).all() and (db[:, :128] == 0).all()
    idx = ts.argmax(q, k, 10.0, bias)
    assert (idx >= 128).all()


def test_non_contiguous_inputs_and_upstream():
    """Transposed, sliced and expanded inputs; an expanded (stride-0) upstream gradient."""
    B, N, M, C, D = 2, 30, 45, 24, 5
    q = F.normalize(torch.randn(B, C, N, device=DEVICE), dim=1).transpose(1, 2)  # (B, N, C) strided
    k = torch.zeros(B, M, 2 * C, device=DEVICE)[..., ::2]  # every other channel
    k.copy_(F.normalize(torch.randn(B, M, C, device=DEVICE), dim=-1))
    v = torch.randn(D, B, M, device=DEVICE).permute(1, 2, 0)  # (B, M, D)
    bias = torch.randn(M, B, device=DEVICE).t()  # (B, M)
    bias[:, 3] = -math.inf
    assert not any(t.is_contiguous() for t in (q, k, v, bias))
    for fn, ref, t in [(_attend(ts, 4.0), _attend(reference, 4.0), [q, k, v, bias]),
                       (_lse(ts, 4.0), _lse(reference, 4.0), [q, k, bias])]:
        _assert_fp32_matches(fn, ref, t)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, bias)]
    ts.attend(*leaves[:3], 4.0, leaves[3]).sum().backward()  # upstream: ones expanded, stride 0
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v, bias)]
    reference.attend(*ref_leaves[:3], 4.0, ref_leaves[3]).sum().backward()
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1.3e-6, atol=1e-5)


def test_partial_requires_grad():
    """Only some inputs need a gradient: the others get None and the kernels for them are skipped."""
    q, k, v, bias = _inputs(1, 9, 11, 6, 2)
    kk = k.clone().requires_grad_()
    out = ts.attend(q, kk, v, 2.0, bias)
    (dk,) = torch.autograd.grad(out.sum(), [kk])
    kr = k.double().requires_grad_()
    (dk_ref,) = torch.autograd.grad(reference.attend(q.double(), kr, v.double(), 2.0, bias.double()).sum(), [kr])
    torch.testing.assert_close(dk.double(), dk_ref, rtol=1.3e-6, atol=1e-5)
    qq = q.clone().requires_grad_()
    (dq,) = torch.autograd.grad(ts.lse(qq, k, 2.0, None).sum(), [qq])
    qr = q.double().requires_grad_()
    (dq_ref,) = torch.autograd.grad(reference.lse(qr, k.double(), 2.0, None).sum(), [qr])
    torch.testing.assert_close(dq.double(), dq_ref, rtol=1.3e-6, atol=1e-5)


def test_public_ops_unbatched():
    q, k, v, bias = _inputs(1, 13, 29, 10, 3)
    out = kernels.softmax_attend(q[0], k[0], v[0], scale=3.0, bias=bias[0], backend="triton")
    assert out.shape == (13, 3)
    torch.testing.assert_close(out, reference.attend(q, k, v, 3.0, bias)[0], rtol=1.3e-6, atol=1e-5)
    idx = kernels.softmax_argmax(q[0], k[0], scale=3.0, bias=bias[0], backend="triton")
    assert idx.shape == (13,) and idx.dtype == torch.int64


# ------------------------------------------------------------------------------------------------
# 16-bit inputs: error against the fp32 reference at most 2x that of torch at the same precision
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["lse", "attend"])
def test_half_precision(dtype, op):
    if dtype == torch.bfloat16 and DEVICE == "cpu" and not INTERPRET:
        pytest.skip("bf16 runs on CUDA or under the interpreter only")
    B, N, M, C, D = 2, 70, 100, 48, 3
    q, k, v, bias = _inputs(B, N, M, C, D, masked=(0, 77))
    scale = 1 / 0.07
    if op == "lse":
        fn, ref, t = _lse(ts, scale), _lse(reference, scale), [q, k, bias]
    else:
        fn, ref, t = _attend(ts, scale), _attend(reference, scale), [q, k, v, bias]
    low = [x.to(dtype) for x in t]
    out, grads = _run(fn, low)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    naive_out, naive_grads = _run(ref, low)
    # The oracle: fp32 on the same (rounded) inputs.
    ref_out, ref_grads = _run(ref, [x.float() for x in low])
    floor = 1e-3 if dtype == torch.float16 else 8e-3
    assert _err(out, ref_out) <= 2 * _err(naive_out, ref_out) + floor
    for i, (g, n, r) in enumerate(zip(grads, naive_grads, ref_grads)):
        assert torch.isfinite(g).all(), f"grad {i}"
        tol = 2 * _err(n, r) + floor * (1 + r.abs().max().item())
        assert _err(g, r) <= tol, f"grad {i}: {_err(g, r):.3g} > {tol:.3g}"


def test_half_precision_argmax():
    q, k, _, bias = _inputs(2, 60, 90, 32, 1)
    idx = ts.argmax(q.half(), k.half(), 1 / 0.07, bias.half())
    S = reference.scores(q.half().double(), k.half().double(), 1 / 0.07, bias.half().double())
    chosen = S.gather(2, idx.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(chosen, S.amax(-1), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# argmax and nearest: ties, masks, ragged sizes
# ------------------------------------------------------------------------------------------------
def test_argmax_ties_go_to_smallest_index():
    """Duplicate keys within a tile and across tiles (M > BLOCK_M = 64): the first one wins."""
    B, N, M, C = 2, 10, 150, 8
    q, k, _, _ = _inputs(B, N, M, C, 1, masked=())
    k[:, 100] = q[:, 0]  # q_0's best key, duplicated later in another tile ...
    k[:, 140] = q[:, 0]
    k[:, 7] = q[:, 1]  # ... and q_1's within the first tile, then in later tiles
    k[:, 9] = q[:, 1]
    k[:, 70] = q[:, 1]
    idx = ts.argmax(q, k, 1.0, None)
    torch.testing.assert_close(idx, reference.argmax(q, k, 1.0, None))
    assert (idx[:, 0] == 100).all() and (idx[:, 1] == 7).all()
    # Masking the winner moves the choice to the next duplicate; exact bias ties also go left.
    bias = torch.zeros(B, M, device=q.device)
    bias[:, 7] = -math.inf
    assert (ts.argmax(q, k, 1.0, bias)[:, 1] == 9).all()
    bias[:, :3] = -math.inf  # all scores equal (q = 0): the first unmasked key
    assert (ts.argmax(torch.zeros(B, 5, C, device=q.device), k, 1.0, bias) == 3).all()


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 130), (1, 130, 7), (3, 257, 190)],
                         ids=lambda s: "x".join(map(str, s)))
def test_nearest_ragged(shape):
    B, N, M = shape
    x = torch.rand(B, N, 3, device=DEVICE)
    y = torch.rand(B, M, 3, device=DEVICE)
    idx = tn.nearest_index(x, y)
    assert idx.dtype == torch.int64 and idx.shape == (B, N)
    d_ref = ((x.double().unsqueeze(2) - y.double().unsqueeze(1)) ** 2).sum(-1)
    chosen = d_ref.gather(2, idx.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(chosen, d_ref.amin(-1), rtol=0, atol=1e-7)
    d2, idx2 = kernels.nearest(x, y, backend="triton")
    torch.testing.assert_close(idx2, idx)
    torch.testing.assert_close(d2.double(), d_ref.amin(-1), rtol=1e-5, atol=1e-7)


def test_nearest_ties_non_contiguous_and_float64():
    """Duplicated candidates (indices 3, 90 and 150: across 32-wide key tiles) resolve to the smallest
    index, like torch.argmin; strided inputs and float64 work; near neighbours at 1e-4 separation on a
    unit-scale cloud are resolved (the |x|^2 - 2xy + |y|^2 expansion can fail there)."""
    B, N, M = 2, 40, 200
    y = torch.rand(B, M, 3, dtype=torch.float64, device=DEVICE) + 10.0  # far from the origin
    y[:, 150] = y[:, 3]
    y[:, 90] = y[:, 3]
    x = y[:, :N].clone()
    x[:, 5] = y[:, 3]
    x[:, 6] = y[:, 120] + 1e-4
    y[:, 121] = y[:, 120] + 3e-4
    for dtype in (torch.float32, torch.float64):
        xs = torch.stack([x, x], dim=-1).flatten(-2).to(dtype)[..., ::2]  # stride 2 in the coordinates
        ys = y.to(dtype).transpose(0, 1).contiguous().transpose(0, 1)  # batch stride 3, not M * 3
        assert not xs.is_contiguous() and not ys.is_contiguous()
        idx = tn.nearest_index(xs, ys)
        torch.testing.assert_close(idx, reference.nearest_index(xs, ys))
        assert (idx[:, 5] == 3).all() and (idx[:, 3] == 3).all() and (idx[:, 6] == 120).all()


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ts.lse(q, q, 1.0, None)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tn.nearest_index(q, q)


# ------------------------------------------------------------------------------------------------
# GPU only: compiled kernels
# ------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("C,D", [(3, 3), (256, 3), (300, 130), (1024, 17)])
def test_cuda_fp32_compiled(C, D):
    torch.backends.cuda.matmul.allow_tf32 = False
    q, k, v, bias = _inputs(2, 1031, 777, C, D, device="cuda")
    _assert_fp32_matches(_attend(ts, 1 / 0.07), _attend(reference, 1 / 0.07), [q, k, v, bias])
    _assert_fp32_matches(_lse(ts, 1 / 0.07), _lse(reference, 1 / 0.07), [q, k, bias])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_compiled(dtype):
    q, k, v, bias = _inputs(2, 1031, 777, 256, 3, device="cuda", masked=(0, 500))
    low = [x.to(dtype) for x in (q, k, v, bias)]
    out, grads = _run(_attend(ts, 1 / 0.07), low)
    naive_out, naive_grads = _run(_attend(reference, 1 / 0.07), low)
    ref_out, ref_grads = _run(_attend(reference, 1 / 0.07), [x.float() for x in low])
    floor = 1e-3 if dtype == torch.float16 else 8e-3
    assert _err(out, ref_out) <= 2 * _err(naive_out, ref_out) + floor
    for g, n, r in zip(grads, naive_grads, ref_grads):
        assert _err(g, r) <= 2 * _err(n, r) + floor * (1 + r.abs().max().item())


@needs_cuda
def test_cuda_float64_and_nearest_compiled():
    q, k, v, bias = _inputs(1, 100, 90, 40, 3, dtype=torch.float64, device="cuda")
    out = ts.attend(q, k, v, 2.0, bias)
    torch.testing.assert_close(out, reference.attend(q, k, v, 2.0, bias), rtol=1e-12, atol=1e-12)
    x, y = torch.rand(2, 3000, 3, device="cuda"), torch.rand(2, 2000, 3, device="cuda")
    idx = tn.nearest_index(x, y)
    d = torch.cdist(x.double(), y.double())
    torch.testing.assert_close(d.gather(2, idx.unsqueeze(-1)).squeeze(-1), d.amin(-1), rtol=0, atol=1e-6)
