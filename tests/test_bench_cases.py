"""Every benchmark case runs here or is skipped for a stated, legitimate reason (no silent "not run")."""
import subprocess
import sys

import pytest
import torch

from bench import _harness as H
from bench.report import OPS, PROVIDERS

# The only reasons a case may not run on a CPU machine.
LEGITIMATE = ("not applicable", "not run: interpreter only, no GPU")


@pytest.mark.parametrize("op", OPS)
def test_every_provider_runs_or_has_a_legitimate_reason(op):
    for provider in PROVIDERS:
        status = H.provider_status(op, provider, torch.device("cpu"))
        assert status is None or status in LEGITIMATE, f"{op} / {provider}: {status}"


def test_every_benchmark_module_collects():
    done = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "error" not in done.stdout.lower()
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    for module in ("bench_softmax_attend", "bench_softmax_lse", "bench_info_nce", "bench_sinkhorn", "bench_chamfer",
                   "bench_train_step", "bench_default_step"):
        assert any(module in line for line in collected), f"no case collected from bench/{module}.py"
