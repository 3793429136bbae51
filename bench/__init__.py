"""Benchmark suite of the kernels (pytest-benchmark), its report and saved results.

Run ``make bench`` (quick CPU subset) or ``make bench-full``; ``python -m bench.report`` turns the
JSON files under bench/results/ into bench/RESULTS.md and the plots under bench/plots/.
"""
