"""Every benchmark case runs here or is skipped for a stated, legitimate reason (no silent "not run")."""
import subprocess
import sys
from pathlib import Path

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


def test_gpu_check_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    """bench/gpu_check.sh --dry-run: every stage's command, exit 0, nothing written; bad calls refused."""
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    out = tmp_path / "gpu"
    dry = subprocess.run(["bash", str(script), "--dry-run", str(out)], capture_output=True, text=True,
                         cwd=script.parents[1])
    assert dry.returncode == 0, dry.stderr
    assert [line.split()[1] for line in dry.stdout.splitlines() if line.strip().startswith("stage")] == \
        ["1", "2", "3", "4"]
    assert "tests/test_triton.py" in dry.stdout and "bench_train_step.py" in dry.stdout and str(out) in dry.stdout
    assert not out.exists()
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=script.parents[1])
    assert usage.returncode == 2 and "usage:" in usage.stderr
    if not torch.cuda.is_available():
        here = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, cwd=script.parents[1])
        assert here.returncode == 1 and "no CUDA device" in here.stderr and not out.exists()


def test_the_long_run_picture_chains_every_stage_from_its_parent(tmp_path):
    """bench.long_run puts each stage after the stage it started from (stage 6 after stage 4, not
    after stage 5, which was not kept), draws the picture, and names a folder without logs."""
    from bench import long_run

    stages = {stage: rows for stage, _, rows in long_run.chain(long_run.ROOT / "mapconnet/pretrained/resume")}
    assert stages[6][0]["step"] == stages[5][0]["step"] == stages[4][-1]["step"]
    assert stages[6][0]["hours"] == pytest.approx(stages[4][-1]["hours"] + stages[6][0]["seconds"] / 3600)
    assert stages[7][0]["step"] == stages[6][-1]["step"]
    long_run.main(["--out", str(tmp_path / "run.png")])
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="no stage logs"):
        long_run.chain(tmp_path)
