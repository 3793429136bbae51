"""Dense PyTorch reference of every op (backend ``"torch"``).

These build the full (B, N, M) score matrix. They are the oracle of the tests, the "naive PyTorch"
of the benchmarks and the fastest path for small problems. They compute in the input dtype (the
tests upcast to float32/float64 for the oracle) and are written in the log domain so that logits
of magnitude 1/tau = 100 do not overflow. Inputs are the validated (B, N, C) tensors of the public
ops; see those for the full docstrings.
"""
from __future__ import annotations

import math

import torch


def scores(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """S_ij = scale * <q_i, k_j> + bias_j, shape (B, N, M)."""
    s = torch.bmm(q, k.transpose(1, 2)) * scale
    if bias is not None:
        s = s + bias.unsqueeze(1)
    return s


def lse(q, k, scale, bias=None):
    """(B, N): log sum_j exp(S_ij)."""
    return torch.logsumexp(scores(q, k, scale, bias), dim=-1)


def attend(q, k, v, scale, bias=None):
    """(B, N, D): sum_j softmax_j(S_ij) v_j."""
    return torch.bmm(torch.softmax(scores(q, k, scale, bias), dim=-1), v)


def sinkhorn(q, k, v, scale, iters):
    """Log-domain Sinkhorn on one dense score matrix, built once: ((B, N, D) warped v, (B, M) log b).

    The streaming backends recompute the scores in each of the 2 * iters - 1 LSE passes; here the
    (B, N, M) matrix S = scale * q k^T is formed once and every pass is a logsumexp over it, which
    is what makes dense the fast path at small sizes. Autograd keeps about two (B, N, M) tensors
    per pass.
    """
    s = scores(q, k, scale, None)  # (B, N, M)
    N, M = s.shape[1], s.shape[2]
    log_mu, log_nu = -math.log(N), -math.log(M)
    log_a = torch.full_like(s[:, :, 0], log_mu)  # (B, N)
    log_b = torch.zeros_like(s[:, 0, :])  # (B, M): any constant, softmax ignores it
    for it in range(iters):
        if it > 0:
            log_a = log_mu - torch.logsumexp(s + log_b.unsqueeze(1), dim=2)
        log_b = log_nu - torch.logsumexp(s + log_a.unsqueeze(2), dim=1)
    return torch.bmm(torch.softmax(s + log_b.unsqueeze(1), dim=-1), v), log_b


def argmax(q, k, scale, bias=None):
    """(B, N) int64: argmax_j S_ij."""
    return scores(q, k, scale, bias).argmax(dim=-1)


def nearest_index(x, y):
    """(B, N) int64: index of each x_i's nearest y_j (direct differences, not the |x|^2 - 2xy + |y|^2
    expansion, whose cancellation error exceeds near-neighbour distances on unit-scale meshes)."""
    d2 = ((x.unsqueeze(2) - y.unsqueeze(1)) ** 2).sum(-1)  # (B, N, M)
    return d2.argmin(dim=-1)

