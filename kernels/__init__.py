"""Streaming all-pairs kernels: correspondence softmax, Sinkhorn, InfoNCE, nearest/Chamfer, PMD.

Every op takes ``backend=`` ("auto", "torch", "chunked", "keops", "triton"; "kdtree" for the
nearest-neighbour ops). Only "torch", the dense reference, builds an N x M matrix.
"""
from .chamfer import chamfer, nearest, pmd
from .dispatch import available_backends
from .info_nce import info_nce
from .sinkhorn import sinkhorn_correspondence
from .softmax import softmax_argmax, softmax_attend, softmax_lse

__all__ = [
    "available_backends",
    "chamfer",
    "info_nce",
    "nearest",
    "pmd",
    "sinkhorn_correspondence",
    "softmax_argmax",
    "softmax_attend",
    "softmax_lse",
]
