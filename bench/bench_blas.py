"""The hardware-limit reference measured in the same run: fp32 matmul (BLAS on CPU, cuBLAS on GPU)."""
import torch

from bench import _harness as H


def test_blas_fp32_matmul(benchmark, machine):
    n = 2048
    dev = H.device()
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)

    def mm():
        torch.mm(a, b)
        H.sync(dev)

    benchmark.group = "blas"
    benchmark.pedantic(mm, rounds=5, warmup_rounds=1, iterations=1)
    info = dict(machine)
    info.update(op="blas_fp32_matmul", provider="torch", status="ok", N=n,
                gflops=2 * n ** 3 / benchmark.stats.stats.min / 1e9)
    benchmark.extra_info.update(info)
