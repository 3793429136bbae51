"""Block sizes of the Triton kernels by shape, dtype and device (compute capability).

A kernel launch fails ("out of resource: shared memory") when its shared memory exceeds what one
thread block may opt in to on the device, and that limit differs by a factor of 2.3 between GPUs
that the same code runs on. The softmax kernels' shared memory is their pipelined dot-operand
tiles, so their launchers shrink the contraction chunk (BLOCK_C, BLOCK_D) until those tiles fit
the device (`chunk_block`). ``tests/test_triton_compile.py`` compiles the largest configuration
each launcher picks for sm_80, sm_86, sm_89 and sm_90 without a GPU and checks it against
`SHARED_MEMORY_PER_BLOCK`; docs/DESIGN.md 3.2 has the measured table.
"""
from __future__ import annotations

import torch
import triton

# Opt-in shared memory per thread block, bytes, by compute capability, from the CUDA C++
# Programming Guide, "Compute Capabilities": the technical-specifications table's row "Maximum
# amount of shared memory per thread block" and each architecture's "Shared Memory" subsection
# (https://docs.nvidia.com/cuda/cuda-c-programming-guide/index.html#compute-capabilities): 7.5
# 64 KB; 8.0 and 8.7 163 KB (A100); 8.6 and 8.9 99 KB (RTX 30xx/40xx, A10, A40, L4, L40); 9.0 227 KB
# (H100, H200); 10.0 227 KB and 12.0 99 KB (Blackwell tuning guide, "Occupancy"). Of each SM's
# 164 / 100 / 228 KB, 1 KB is reserved for the system, hence the odd sizes.
SHARED_MEMORY_PER_BLOCK = {
    (7, 5): 64 * 1024,
    (8, 0): 163 * 1024, (8, 7): 163 * 1024,
    (8, 6): 99 * 1024, (8, 9): 99 * 1024,
    (9, 0): 227 * 1024, (10, 0): 227 * 1024,
    (12, 0): 99 * 1024,
}
# Triton's software pipeline on NVIDIA keeps up to num_stages copies of each tile a loop loads
# (3 is Triton's default; the launchers pass it explicitly so that this estimate stays true).
NUM_STAGES = 3
MIN_BLOCK = 16  # the smallest legal dot K for 16-bit operands on NVIDIA


def pow2_block(n: int, cap: int) -> int:
    """The power of two covering n, clamped to [MIN_BLOCK, cap]."""
    return min(cap, max(MIN_BLOCK, triton.next_power_of_2(n)))


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None elsewhere (the interpreter on CPU tensors has no limits)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def shared_memory_per_block(capability: tuple[int, int]) -> int:
    """Opt-in shared memory per block in bytes. A capability missing from the table gets the
    smallest listed limit, which every listed device can hold."""
    return SHARED_MEMORY_PER_BLOCK.get(capability, min(SHARED_MEMORY_PER_BLOCK.values()))


def chunk_block(width: int, cap: int, bytes_per_column: int, capability: tuple[int, int] | None) -> int:
    """Chunk of a contraction over `width` (a power of two in [MIN_BLOCK, cap]) whose pipelined tiles
    fit the device.

    One step of the contraction loads tiles with `bytes_per_column` bytes per chunk column (e.g.
    (BLOCK_N + BLOCK_M) * itemsize for a (BLOCK_N, chunk) and a (chunk, BLOCK_M) operand), and Triton
    keeps NUM_STAGES steps in shared memory; the chunk halves until that fits. No limit without a
    capability (CPU / interpreter).
    """
    block = pow2_block(width, cap)
    if capability is None:
        return block
    limit = shared_memory_per_block(capability)
    while block > MIN_BLOCK and NUM_STAGES * bytes_per_column * block > limit:
        block //= 2
    return block
