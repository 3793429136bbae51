"""pytest set-up of the benchmark suite (``pytest bench ...``; ``make test`` never collects it).

* collects ``bench_*.py`` files (pyproject's ``testpaths`` only covers tests/ and only applies
  when no path is given);
* registers the ``full`` marker: ``make bench`` runs ``-m "not full"`` (a quick CPU subset of a few
  minutes), ``make bench-full`` everything;
* the ``run_case`` fixture: predict, skip-with-a-record or warm up, time, measure peak memory and
  fill ``benchmark.extra_info`` (see bench/_harness.py).
"""
from __future__ import annotations

import math
import os

import pytest

from bench import _harness as H

QUICK_TIME_CAP_S = 40.0     # per call; past it a case is recorded as too slow
FULL_TIME_CAP_S = 300.0
QUICK_BUDGET_S = 12.0       # timing budget per case in the quick run (rounds = budget / predicted)
FULL_BUDGET_S = 20.0


def pytest_configure(config):
    config.addinivalue_line("markers", "full: part of the long sweep only (make bench-full)")
    # pytest-benchmark writes --benchmark-json at the end of the session but does not create its folder
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), exist_ok=True)


def pytest_collect_file(file_path, parent):
    # files named on the command line are collected by pytest itself: do not collect them twice
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def machine():
    """Device, versions and the fp32 BLAS matmul rate measured at the start of this run."""
    import torch

    dev = H.device()
    return {
        "device": H.device_name(),
        "device_kind": dev.type,
        "versions": H.versions(),
        "blas_fp32_gflops": H.blas_fp32_gflops(),
        "torch_threads": torch.get_num_threads(),
        "smoke": H.SMOKE,
        "shared_machine_note": ("2 shared CPU cores; other jobs may have run concurrently"
                                if dev.type == "cpu" else ""),
    }


@pytest.fixture
def run_case(benchmark, machine, request):
    full = request.node.get_closest_marker("full") is not None
    cap = float(os.environ.get("BENCH_TIME_CAP_S", FULL_TIME_CAP_S if full else QUICK_TIME_CAP_S))
    budget_s = FULL_BUDGET_S if full else QUICK_BUDGET_S

    def _run(case: H.Case):
        case = H.effective(case)
        dev = H.device()
        info = dict(machine)
        info.update(op=case.op, provider=case.provider, mode=case.mode, N=case.n, M=case.m, C=case.c,
                    B=case.b, D=H.D_VALUES if case.op in ("softmax_attend", "sinkhorn") else None,
                    pairs=case.pairs, matmul_flops=H.matmul_flops(case), suite="full" if full else "quick")
        benchmark.group = f"{case.op} mode={case.mode} C={case.c} B={case.b}"
        need = H.predicted_bytes(case)
        mem_budget, desc = H.memory_budget_bytes()
        info["predicted_mb"] = need / H.MiB
        status = H.provider_status(case.op, case.provider, dev)
        if status is None and need > mem_budget:
            status = (f"skipped: needs {need / H.GiB:.1f} GB (predicted from the dense N*M footprint; "
                      f"{desc}; per-case budget {mem_budget / H.GiB:.1f} GB)")
        secs = H.predicted_seconds(case) if dev.type == "cpu" else 0.0
        info["predicted_s"] = secs
        if status is None and secs > cap:
            status = f"skipped: too slow here (predicted {secs:.0f} s per call > {cap:.0f} s cap)"
        if status is None:
            try:
                H.run_once(H.tiny(case), dev)   # compiles KeOps modules / JITs Triton: untimed
            except Exception as e:  # noqa: BLE001 - record, do not drop
                status = f"error: {type(e).__name__}: {str(e)[:160]}"
        if status is not None:
            info["status"] = status
            benchmark.extra_info.update(info)
            benchmark.pedantic(H.noop, rounds=1, iterations=1)
            return

        if dev.type == "cuda":
            rounds, warmup = 10, 3
        else:
            rounds = int(max(1, min(5, budget_s // max(secs, 1e-3))))
            warmup = 1 if secs < 2.0 else 0
        setup, target = H.callables(case, dev)
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
        med = benchmark.stats.stats.median
        best = benchmark.stats.stats.min   # best of rounds: other jobs on the shared cores only add time
        del setup, target
        if dev.type == "cuda":
            mem = H.cuda_peak(case, dev)
        else:
            mem = H.child_peak(case, timeout=max(120.0, 6 * secs + 60))
        info.update(status=mem.pop("status", "ok"), rounds=rounds, warmup_rounds=warmup, median_s=med,
                    min_s=best, pairs_per_s=case.pairs / best, tflops=info["matmul_flops"] / best / 1e12)
        if dev.type == "cpu" and info["tflops"]:
            info["fraction_of_blas"] = info["tflops"] * 1e3 / machine["blas_fp32_gflops"]
        info["peak_mb"] = mem.get("peak_mb", math.nan)
        info["memory_method"] = mem.get("method")
        benchmark.extra_info.update(info)

    return _run
