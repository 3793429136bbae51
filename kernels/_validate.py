"""Input checks shared by every public op.

All checks run at the public boundary, before dispatch, so every backend sees the same
well-formed input: 3-D tensors (B, N, C) of one floating dtype, on one device, finite, with
matching batch and channel sizes. Messages name the argument, what it was and what was expected.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend computes in: float64 for float64 inputs (so gradcheck can run),
    float32 for float32, float16 and bfloat16 (half-precision sums lose too much)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_batched(name: str, t, *, last_dim: int | None = None) -> tuple[torch.Tensor, bool]:
    """Return `t` as a (B, N, C) tensor and whether a batch dim was added.

    A 2-D input (N, C) means B = 1; the caller drops the batch dim from the result again.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (B, N, C) or (N, C), got shape {tuple(t.shape)}")
    unbatched = t.dim() == 2
    if unbatched:
        t = t.unsqueeze(0)
    if t.shape[0] == 0 or t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"{name} must have at least one batch element, point and channel, got shape {tuple(t.shape)}")
    if last_dim is not None and t.shape[-1] != last_dim:
        raise ValueError(f"{name} must have {last_dim} coordinates in its last dim, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf values (shape {tuple(t.shape)}); expected finite values")
    return t, unbatched


def same_kind(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Check that `others` share `ref`'s dtype, device and batch size."""
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; expected the same dtype")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; expected one device")
        if t.shape[0] != ref.shape[0]:
            raise ValueError(
                f"{name} has batch size {t.shape[0]} (shape {tuple(t.shape)}) but {ref_name} has "
                f"{ref.shape[0]} (shape {tuple(ref.shape)}); expected equal batch sizes"
            )


def channels_match(q: torch.Tensor, k: torch.Tensor, q_name: str = "q", k_name: str = "k") -> None:
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{q_name} has {q.shape[-1]} channels (shape {tuple(q.shape)}) but {k_name} has {k.shape[-1]} "
            f"(shape {tuple(k.shape)}); expected the same channel count C"
        )


def positive_scalar(name: str, value) -> float:
    """A finite, strictly positive Python float (scale, tau, eps)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def bias_for(bias, k: torch.Tensor, unbatched: bool) -> torch.Tensor | None:
    """Validate a per-key bias (B, M) (or (M,) for unbatched inputs) against keys k (B, M, C).

    -inf masks a key; NaN, +inf and a batch whose every key is masked are errors.
    """
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if unbatched and bias.dim() == 1:
        bias = bias.unsqueeze(0)
    B, M = k.shape[0], k.shape[1]
    if tuple(bias.shape) != (B, M):
        raise ValueError(f"bias must have shape (B, M) = {(B, M)} to match the keys, got {tuple(bias.shape)}")
    if bias.dtype != k.dtype:
        raise TypeError(f"bias has dtype {bias.dtype} but the keys have {k.dtype}; expected the same dtype")
    if bias.device != k.device:
        raise ValueError(f"bias is on {bias.device} but the keys are on {k.device}; expected one device")
    if bool(torch.isnan(bias).any()) or bool((bias == math.inf).any()):
        raise ValueError("bias contains NaN or +inf; expected finite values or -inf (a masked key)")
    all_masked = torch.isinf(bias).all(dim=1)
    if bool(all_masked.any()):
        b = int(all_masked.nonzero()[0, 0])
        raise ValueError(f"bias[{b}] is -inf for every key; expected at least one unmasked key per batch element")
    return bias


def reduction_name(reduction: str, allowed=("mean", "sum", "none")) -> str:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")
    return reduction


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values
