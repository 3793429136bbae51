"""info_nce (streaming InfoNCE denominator): dense torch vs the streaming backends."""
import pytest

from bench._harness import MODES, grid

PROVIDERS = ("torch", "chunked", "keops", "triton")
NS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)


def quick(c):
    if c.mode != "fwd+bwd" or c.b != 1 or c.c != 256:
        return False
    if c.provider == "keops":
        return c.n == 1024
    return c.n in (1024, 4096)


@pytest.mark.parametrize("case", grid("info_nce", PROVIDERS, NS, (64, 256), (1, 4), MODES, quick))
def test_info_nce(run_case, case):
    run_case(case)
