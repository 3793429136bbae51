"""How much memory this machine can give, and how much a training step needs."""
from __future__ import annotations

import os

# Peak resident memory of one training step per mesh vertex per batch item, measured with
# `python -m bench.step_memory --backend chunked` (fp32, CPU): 206-209 KB with the default decoder
# widths 256/128/64 (448 channels) at 1,723 and 6,890 vertices, batch 2 and 4; 365 KB with the
# published 1024/512/256 (1,792 channels) at 13,348. A straight line through both. The decoder's
# local context added 217-231 KB - 206-209 KB with 8 neighbours (same command, 2026-12-07), so
# about 2.5 KB per neighbour at most. Each decoder hop keeps the same kind of (k, 64) edge tensors
# per vertex as the local context, so it is counted as another such branch.
STEP_BYTES_PER_VERTEX = 158_000
STEP_BYTES_PER_VERTEX_PER_DECODER_CHANNEL = 115
STEP_BYTES_PER_VERTEX_PER_DECODER_NEIGHBOUR = 2_500
UNLABELLED_PASSES = 3  # an unlabelled step keeps three forward passes for its backward


def available_memory() -> int:
    """Bytes of memory available to a new allocation: Linux's MemAvailable (free plus reclaimable
    caches), else free pages from sysconf."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def training_step_bytes(batch_size: int, vertices: int, decoder_widths, unlabelled: bool,
                        decoder_neighbours: int = 0, decoder_hops: int = 0) -> int:
    """Estimated peak bytes of one training step (about 20% above the measured points)."""
    per_vertex = STEP_BYTES_PER_VERTEX + STEP_BYTES_PER_VERTEX_PER_DECODER_CHANNEL * sum(decoder_widths) + \
        STEP_BYTES_PER_VERTEX_PER_DECODER_NEIGHBOUR * decoder_neighbours * (1 + decoder_hops)
    return int(1.2 * per_vertex * batch_size * vertices * (UNLABELLED_PASSES if unlabelled else 1))
