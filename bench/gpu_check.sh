#!/usr/bin/env bash
# The whole GPU path in one call, for a session that draws a CUDA device (README "Kernels API").
#
#     bash bench/gpu_check.sh OUT            # on the GPU machine, from the repository root
#     bash bench/gpu_check.sh --dry-run OUT  # anywhere: print the plan, run nothing, exit 0
#
# Stages (each under its own time limit, so that one slow stage cannot eat the others' time; the
# whole script is sized for < 8 minutes on an H100/H200):
#   1. Triton kernels compiled (not interpreted): tests/test_triton.py and tests/test_kernels.py,
#      including the fp16/bf16 runs against the fp32 reference (tests marked needs_cuda);
#   2. the benchmark sweep's quick cases on the GPU: softmax_attend, softmax_lse, Sinkhorn,
#      InfoNCE, Chamfer; triton vs keops vs chunked vs dense torch; TFLOP/s per case;
#   3. one full training step at smpl, full and x4 (~53k vertices), batch 1, dense vs streaming,
#      with peak memory (bench/bench_train_step.py; the dense backend's failures are recorded);
#   4. bench/RESULTS.md regenerated from OUT's JSON into OUT/RESULTS.md, plus OUT/device.txt.
# Everything it writes goes under OUT; commit OUT (e.g. bench/results/gpu-h200) with the device name.
set -euo pipefail

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
out="${1:-}"
if [[ -z "$out" || "$out" == -* ]]; then
  echo "usage: bash bench/gpu_check.sh [--dry-run] OUT  (OUT: folder for the JSON results and RESULTS.md)" >&2
  exit 2
fi
py="${PYTHON:-python}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && py=.venv/bin/python

stages=(
  "600|1 compiled Triton kernels vs the fp32 reference|env -u TRITON_INTERPRET $py -m pytest -q tests/test_triton.py tests/test_kernels.py --junitxml=$out/kernel-tests.xml"
  "240|2 kernel sweep (quick cases) on the GPU|env -u TRITON_INTERPRET BENCH_TIME_CAP_S=30 $py -m pytest bench -q --benchmark-only -m 'not full' --benchmark-json=$out/gpu-quick.json --ignore=bench/bench_train_step.py"
  "150|3 one training step at smpl / full / x4, dense vs streaming, peak memory|env -u TRITON_INTERPRET BENCH_TIME_CAP_S=60 $py -m pytest bench/bench_train_step.py -q --benchmark-only --benchmark-json=$out/gpu-train-step.json"
  "60|4 RESULTS.md from this run's JSON|$py -m bench.report --results $out --out $out/RESULTS.md --plots $out/plots"
)

if (( dry )); then
  echo "gpu_check plan (dry run; nothing is executed), results into $out:"
  for stage in "${stages[@]}"; do
    IFS='|' read -r limit title cmd <<< "$stage"
    echo "  stage $title (limit ${limit} s):"
    echo "    $cmd"
  done
  exit 0
fi

if ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; use --dry-run to see the plan" >&2
  exit 1
fi
mkdir -p "$out"
$py -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, torch {torch.__version__}')" | tee "$out/device.txt"
status=0
for stage in "${stages[@]}"; do
  IFS='|' read -r limit title cmd <<< "$stage"
  echo "== stage $title (limit ${limit} s)"
  start=$(date +%s)
  if timeout "$limit" bash -c "$cmd"; then result=ok; else result="failed ($?)"; status=1; fi
  echo "stage $title: $result in $(( $(date +%s) - start )) s" | tee -a "$out/stages.txt"
done
exit $status
