"""Bad input at the public boundary: clear errors naming the argument and what was expected."""
import math

import pytest
import torch

import kernels


def qkv(B=2, N=5, M=6, C=4, D=3):
    return torch.randn(B, N, C), torch.randn(B, M, C), torch.randn(B, M, D)


def test_batch_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k has batch size 1.*expected equal batch sizes"):
        kernels.softmax_lse(q, k[:1])


def test_channel_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q has 4 channels.*k has 3"):
        kernels.softmax_attend(q, k[..., :3], v)


def test_value_rows_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"v must have one row per key"):
        kernels.softmax_attend(q, k, v[:, :2])
    with pytest.raises(ValueError, match=r"v must have one row per key"):
        kernels.sinkhorn_correspondence(q, k, v[:, :2])


@pytest.mark.parametrize("shape", [(2, 0, 4), (2, 5, 0), (0, 5, 4)])
def test_empty(shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have at least one"):
        kernels.softmax_lse(torch.randn(shape), k)


def test_empty_keys():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k must have at least one"):
        kernels.softmax_argmax(q, k[:, :0])


def test_non_float_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q must be a floating tensor.*torch.int64"):
        kernels.softmax_lse(q.long(), k)
    with pytest.raises(TypeError, match=r"k has dtype torch.float64 but q has torch.float32"):
        kernels.softmax_lse(q, k.double())
    with pytest.raises(TypeError, match=r"must be a torch.Tensor"):
        kernels.softmax_lse(q.tolist(), k)


def test_wrong_rank():
    with pytest.raises(ValueError, match=r"q must have shape \(B, N, C\) or \(N, C\), got shape \(5,\)"):
        kernels.softmax_lse(torch.randn(5), torch.randn(5, 1))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_inf_inputs(bad):
    q, k, v = qkv()
    q[0, 1, 2] = bad
    with pytest.raises(ValueError, match=r"q contains NaN or inf"):
        kernels.softmax_attend(q, k, v)
    x = torch.rand(1, 4, 3)
    x[0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"x contains NaN or inf"):
        kernels.chamfer(x, torch.rand(1, 4, 3))


def test_bias_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"bias must have shape \(B, M\) = \(2, 6\)"):
        kernels.softmax_lse(q, k, bias=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"bias contains NaN or \+inf"):
        kernels.softmax_lse(q, k, bias=torch.full((2, 6), math.nan))
    masked = torch.zeros(2, 6)
    masked[1] = -math.inf
    with pytest.raises(ValueError, match=r"bias\[1\] is -inf for every key"):
        kernels.softmax_lse(q, k, bias=masked)


def test_masked_keys_are_never_attended():
    q, k, v = qkv()
    bias = torch.zeros(2, 6)
    bias[:, :3] = -math.inf
    for backend in ["torch", "chunked"]:
        out = kernels.softmax_attend(q, k, v, bias=bias, backend=backend)
        torch.testing.assert_close(out, kernels.softmax_attend(q, k[:, 3:], v[:, 3:], backend="torch"))


@pytest.mark.parametrize("name,call", [
    ("scale", lambda q, k, v: kernels.softmax_lse(q, k, scale=0.0)),
    ("scale", lambda q, k, v: kernels.softmax_attend(q, k, v, scale=-1.0)),
    ("tau", lambda q, k, v: kernels.info_nce(q, q, tau=0)),
    ("eps", lambda q, k, v: kernels.sinkhorn_correspondence(q, k, v, eps=-0.03)),
    ("scale", lambda q, k, v: kernels.softmax_argmax(q, k, scale=math.nan)),
])
def test_non_positive_scalars(name, call):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"{name} must be a finite number > 0"):
        call(q, k, v)


def test_sinkhorn_refuses_mixed_batching():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"all be batched \(3-D\) or all unbatched \(2-D\), got q 2-D, k 3-D, v 3-D"):
        kernels.sinkhorn_correspondence(q[0], k, v)


def test_iters():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"iters must be an integer >= 0, got -1"):
        kernels.sinkhorn_correspondence(q, k, v, iters=-1)
    with pytest.raises(ValueError, match=r"iters must be an integer >= 0, got 2.5"):
        kernels.sinkhorn_correspondence(q, k, v, iters=2.5)


def test_unknown_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*got 'cuda'"):
        kernels.softmax_lse(q, k, backend="cuda")
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*got 'kdtree'"):
        kernels.softmax_attend(q, k, v, backend="kdtree")  # kdtree serves nearest/chamfer only


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run on cpu.*TRITON_INTERPRET=1"):
        kernels.softmax_lse(q, k, backend="triton")


def test_info_nce_pos_errors():
    q, k, v = qkv(N=5, M=6)
    with pytest.raises(ValueError, match=r"pos=None pairs anchor i with key i and needs N == M, got N = 5, M = 6"):
        kernels.info_nce(q, k)
    with pytest.raises(ValueError, match=r"pos values must lie in \[0, M\) = \[0, 6\), got min 0, max 6"):
        kernels.info_nce(q, k, pos=torch.tensor([[0, 1, 2, 3, 6]] * 2))
    with pytest.raises(ValueError, match=r"pos values must lie in"):
        kernels.info_nce(q, k, pos=torch.full((2, 5), -1))
    with pytest.raises(ValueError, match=r"pos must have shape \(B, N\) = \(2, 5\), got \(2, 4\)"):
        kernels.info_nce(q, k, pos=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"pos must be an int64 tensor, got torch.float32"):
        kernels.info_nce(q, k, pos=torch.zeros(2, 5))


def test_reduction_errors():
    x = torch.rand(1, 4, 3)
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'max'"):
        kernels.chamfer(x, x, reduction="max")
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        kernels.info_nce(torch.randn(3, 4), torch.randn(3, 4), reduction="avg")


def test_point_errors():
    with pytest.raises(ValueError, match=r"x must have 3 coordinates in its last dim, got shape \(1, 4, 2\)"):
        kernels.nearest(torch.rand(1, 4, 2), torch.rand(1, 4, 3))
    with pytest.raises(ValueError, match=r"pmd needs vertex-aligned meshes of one shape"):
        kernels.pmd(torch.rand(1, 4, 3), torch.rand(1, 5, 3))
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of"):
        kernels.nearest(torch.rand(1, 4, 3), torch.rand(1, 4, 3), backend="faiss")
