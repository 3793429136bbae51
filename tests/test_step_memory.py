"""bench.step_memory, the command behind README's "How large a mesh trains" table: a step that fits
reports OK with its peak memory, a step over the cap reports OOM instead of crashing or swapping."""
import re
import subprocess
import sys


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "bench.step_memory", *args], capture_output=True, text=True,
                          timeout=300, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_step_fits_and_reports_peak_memory():
    # 3,000 vertices: the decoder's activations alone (~40 (N, 1024) fp32 tensors, ~0.5 GiB) lift the
    # high-water mark above what imports and model construction reached (0.5-1 GiB).
    line = _run("--backend", "chunked", "--vertices", "3000", "--batch", "1", "--limit-gib", "8")
    assert line.startswith("OK backend=chunked n=3000 batch=1"), line
    peak, before = map(float, re.search(r"peak_rss=([\d.]+) GiB \(before the step ([\d.]+) GiB\)", line).groups())
    assert 0 < before < peak < 8


def test_step_over_the_cap_reports_oom():
    # The interpreter with torch and the model already maps more than 1 GiB of address space, so the
    # step's first large allocation must fail and be reported, not kill the process.
    line = _run("--backend", "torch", "--vertices", "300", "--batch", "1", "--limit-gib", "1")
    assert line.startswith("OOM (") and "backend=torch n=300" in line, line


def test_bad_arguments_are_rejected():
    done = subprocess.run([sys.executable, "-m", "bench.step_memory", "--vertices", "0"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--vertices must be >= 3" in done.stderr
