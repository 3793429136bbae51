"""softmax_attend (correspondence softmax with 3-wide values): dense torch vs the streaming backends."""
import pytest

from bench._harness import MODES, grid

PROVIDERS = ("torch", "chunked", "keops", "triton")
NS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)


def quick(c):
    if c.provider == "keops":
        return c.mode == "fwd+bwd" and c.b == 1 and c.n <= 2048 and c.c == 256
    if c.provider == "triton":
        return c.mode == "fwd+bwd" and c.b == 1 and c.c == 256 and c.n <= 8192
    if c.mode == "fwd+bwd" and c.b == 1:
        return (c.c == 256 and c.n <= 8192) or (c.c == 64 and c.n in (2048, 8192))
    if c.b == 1 and c.c == 256:
        return c.n == 8192                       # fwd and bwd alone at the headline size
    return c.b == 4 and c.c == 64 and c.mode == "fwd+bwd" and c.n == 2048


@pytest.mark.parametrize("case", grid("softmax_attend", PROVIDERS, NS, (64, 256), (1, 4), MODES, quick))
def test_softmax_attend(run_case, case):
    run_case(case)
