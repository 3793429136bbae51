"""Turn every pytest-benchmark JSON under bench/results/ into bench/RESULTS.md and bench/plots/*.png.

    python -m bench.report [--results bench/results] [--out bench/RESULTS.md] [--plots bench/plots]

Tables: time and peak memory per provider and size, ratio to naive (dense) torch, throughput and
fraction of the hardware limit (CPU: the fp32 BLAS matmul rate measured in the same run; CUDA: the
H100 datasheet peaks). The auto rule of kernels/dispatch.py is printed next to the
dense-vs-streaming crossover data it is set from.
"""
from __future__ import annotations

import glob
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

from mapconnet.cli import parse_dataclass
from mapconnet.files import write_text

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDERS = ("torch", "chunked", "keops", "triton", "kdtree")
COLORS = {"torch": "tab:blue", "chunked": "tab:orange", "keops": "tab:green", "triton": "tab:purple",
          "kdtree": "tab:red"}
SOFTMAX_OPS = ("softmax_attend", "softmax_lse", "info_nce", "sinkhorn")
OPS = SOFTMAX_OPS + ("chamfer", "train_step")

# From the NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100) and the
# Hopper whitepaper table (glennklockwood.com/garden/processors/h100); exp rate from FA3 (arXiv
# 2407.08608, section 3.2). Dense (non-sparse) figures.
H100_LIMITS = {
    "SXM": {"bf16_tc_tflops": 989, "tf32_tc_tflops": 495, "fp32_tflops": 67, "hbm_tbs": 3.35, "exp_per_s": 3.9e12},
    "PCIe": {"bf16_tc_tflops": 756, "tf32_tc_tflops": 378, "fp32_tflops": 51, "hbm_tbs": 2.0, "exp_per_s": None},
}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load(results_dir: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping {path}: {e}")
            continue
        run = os.path.basename(path)
        for b in data.get("benchmarks", []):
            e = dict(b.get("extra_info", {}))
            e["run"] = run
            e["datetime"] = data.get("datetime", "")
            e["name"] = b.get("name", "")
            st = b.get("stats", {})
            # "median_s" below is the time the tables use: the best of the timed rounds (the
            # benchmark's min), robust to other jobs on the shared cores, which only add time.
            e["median_of_rounds_s"] = e.get("median_s", st.get("median"))
            if e.get("status") == "ok":
                e["median_s"] = st.get("min")
                if e["median_s"]:
                    e["pairs_per_s"] = e.get("pairs", 0) / e["median_s"]
                    e["tflops"] = (e.get("matmul_flops") or 0) / e["median_s"] / 1e12
            e["rounds_done"] = st.get("rounds")
            rows.append(e)
    return rows


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------
def fmt_s(s):
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def fmt_mb(mb):
    if mb is None or (isinstance(mb, float) and math.isnan(mb)):
        return "-"
    if mb >= 1024:
        return f"{mb / 1024:.2f} GB"
    if mb >= 10:
        return f"{mb:.0f} MB"
    return f"{mb:.1f} MB"


def fmt_n(n):
    return f"{n:,}"


def short_status(e):
    s = e.get("status", "?")
    if s.startswith("skipped: needs"):
        return "skip: needs " + s.split("needs ", 1)[1].split(" (", 1)[0]
    if s.startswith("skipped: too slow"):
        return "skip: too slow (pred. " + s.split("predicted ", 1)[1].split(" per", 1)[0] + ")"
    if s.startswith("not run: interpreter"):
        return "not run: no GPU"
    if s.startswith("not run: mapconnet.model"):
        return "not run: model not landed"
    if s.startswith("not run: backend unavailable"):
        return "not run: unavailable"
    if s == "not applicable":
        return "n/a"
    return s[:40]


def ok(e):
    return e.get("status") == "ok" and e.get("median_s") is not None


def limit_desc(e):
    """(fraction of the hardware limit, text) for a timed softmax-family row."""
    if not ok(e) or not e.get("tflops"):
        return None
    if e.get("device_kind") == "cuda":
        form = "PCIe" if "PCIe" in e.get("device", "") else "SXM"
        lim = H100_LIMITS[form]["fp32_tflops"]
        return e["tflops"] / lim, f"of {lim} TFLOP/s fp32 (H100 {form})"
    gf = e.get("blas_fp32_gflops")
    if not gf:
        return None
    return e["tflops"] * 1e3 / gf, f"of the measured BLAS {gf:.0f} GFLOP/s"


# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------
def index(rows):
    """{(run, op, mode, C, B): {N: {provider: row}}} (the last row wins on duplicates)."""
    idx = defaultdict(lambda: defaultdict(dict))
    for e in rows:
        if e.get("op") not in OPS:
            continue
        idx[(e["run"], e["op"], e["mode"], e["C"], e["B"])][e["N"]][e["provider"]] = e
    return idx


def find(rows, **kw):
    out = [e for e in rows if all(e.get(k) == v for k, v in kw.items())]
    return out


# --------------------------------------------------------------------------------------------
# Crossovers (the data behind the auto rule)
# --------------------------------------------------------------------------------------------
def softmax_crossover(idx):
    """Rows (run, op, C, B, N, pairs, torch, chunked) for fwd+bwd where both ran, and the smallest
    pair count from which chunked is no slower than dense torch, per (run, op, C, B)."""
    table, first = [], {}
    for (run, op, mode, c, b), by_n in sorted(idx.items()):
        if op not in SOFTMAX_OPS or mode != "fwd+bwd":
            continue
        for n in sorted(by_n):
            t, ch = by_n[n].get("torch"), by_n[n].get("chunked")
            if t is None or ch is None:
                continue
            table.append((run, op, c, b, n, t, ch))
            if ok(t) and ok(ch) and ch["median_s"] <= t["median_s"] and (run, op, c, b) not in first:
                first[(run, op, c, b)] = b * n * n
    return table, first


def nearest_crossover(idx):
    table, first = [], {}
    for (run, op, mode, _c, b), by_n in sorted(idx.items()):
        if op != "chamfer" or mode != "fwd+bwd":
            continue
        for n in sorted(by_n):
            t, kd = by_n[n].get("torch"), by_n[n].get("kdtree")
            if t is None or kd is None:
                continue
            table.append((run, b, n, t, kd, by_n[n].get("keops"), by_n[n].get("chunked")))
            if ok(t) and ok(kd) and kd["median_s"] <= t["median_s"] and (run, b) not in first:
                first[(run, b)] = b * n * n
    return table, first


def cell_time(e, base=None):
    if e is None:
        return ""
    if not ok(e):
        return short_status(e)
    s = fmt_s(e["median_s"])
    if base is not None and ok(base) and e is not base:
        s += f" ({e['median_s'] / base['median_s']:.2f}×)"
    return s


def cell_mem(e):
    if e is None:
        return ""
    if not ok(e):
        if e.get("status", "").startswith("skipped: needs"):
            return short_status(e)
        return short_status(e) if not e.get("status", "").startswith("not run") else "-"
    return fmt_mb(e.get("peak_mb"))


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def plots(idx, plot_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"no plots: matplotlib unavailable ({e})")
        return []
    os.makedirs(plot_dir, exist_ok=True)
    made = []
    for (run, op, mode, c, b), by_n in sorted(idx.items()):
        if mode != "fwd+bwd":
            continue
        series = defaultdict(list)
        predicted = defaultdict(list)
        for n in sorted(by_n):
            for prov, e in by_n[n].items():
                if ok(e):
                    series[prov].append((n, e["median_s"], e.get("peak_mb")))
                elif e.get("status", "").startswith("skipped: needs") and e.get("predicted_mb"):
                    predicted[prov].append((n, e["predicted_mb"]))
        if not any(len(v) >= 2 for v in series.values()):
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for prov in PROVIDERS:
            pts = series.get(prov)
            if pts:
                ax_t.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS[prov], label=prov)
                mem = [(p[0], max(p[2], 0.1)) for p in pts if p[2] is not None and not math.isnan(p[2])]
                if mem:
                    ax_m.plot([p[0] for p in mem], [p[1] for p in mem], "o-", color=COLORS[prov], label=prov)
            if predicted.get(prov):
                pp = predicted[prov]
                ax_m.plot([p[0] for p in pp], [p[1] for p in pp], "x:", color=COLORS[prov],
                           label=f"{prov} (predicted, skipped)")
        for ax, ylabel in ((ax_t, "best time per call (s)"), (ax_m, "peak extra memory (MB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("N = M")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        dev = run.rsplit(".", 1)[0]
        fig.suptitle(f"{op} {mode}, C = {c}, B = {b} ({dev})")
        fig.tight_layout()
        name = f"{dev}_{op}_{mode.replace('+', '')}_C{c}_B{b}.png"
        fig.savefig(os.path.join(plot_dir, name), dpi=90)
        plt.close(fig)
        made.append(name)
    return made


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def dispatch_constants():
    try:
        from kernels import dispatch
    except Exception as e:  # noqa: BLE001
        return None, f"kernels.dispatch does not import: {e}"
    names = ("CPU_DENSE_MAX_PAIRS", "CPU_NEAREST_DENSE_MAX_PAIRS", "CUDA_DENSE_MAX_PAIRS")
    return {n: getattr(dispatch, n, None) for n in names}, None


def render(rows, plot_names, plot_rel):
    idx = index(rows)
    lines = ["# Benchmark results", "",
             "Generated by `python -m bench.report` from every JSON file under `bench/results/` "
             "(written by `make bench` = quick CPU subset, `make bench-full` = the whole sweep, or a GPU "
             "run). Do not edit by hand; re-run the report.", "",
             "**CPU timings were taken on a shared 2-core machine while other jobs were "
             "running** (with 2 torch threads on 2 cores, one busy neighbour can slow a whole case several-"
             "fold). Times are the **best of the timed rounds** (1-5 rounds after warm-up; the JSON also "
             "keeps the median), since other jobs only ever add time; still expect ±30% on any single "
             "number, more where a case ran a single round. Peak memory is the growth of the "
             "resident-set high-water mark of a fresh child process per case (CPU) or "
             "`torch.cuda.max_memory_allocated` (CUDA), over the inputs, so it counts only the op's "
             "own buffers.", "",
             "Modes: `fwd` = forward with inputs that require grad (the forward of a training step); "
             "`bwd` = backward alone (peak memory includes its forward); `fwd+bwd` = both. Features are "
             "unit-normalised, scale 1/0.07; values are 3-wide; Sinkhorn runs eps = 0.03, 5 iterations "
             "(9 streaming LSEs + 1 attend). Chamfer: uniform points in the unit cube, both directions "
             "(pairs = 2 B N M). TFLOP/s counts the matmul parts algorithmically (no recompute; LSE "
             "2NMC fwd, 4NMC bwd; attend 2NM(C+D) fwd, 4NM(C+D) bwd), identically for every provider.", ""]

    lines += ["How to repeat (from the repository root):", "",
              "```",
              "make bench                      # quick CPU subset -> bench/results/cpu-quick.json, then this report",
              "make bench-full                 # the whole sweep  -> bench/results/cpu-full.json",
              ".venv/bin/python -m pytest bench/bench_softmax_attend.py --benchmark-only -k 'fwd+bwd-N8192-C256-B1'",
              ".venv/bin/python -m pytest bench/bench_chamfer.py --benchmark-only -k 'fwd+bwd-N100000-C3-B1'",
              "BENCH_SMOKE=1 .venv/bin/python -m pytest bench --benchmark-only -m 'not full'   # debug: sizes / 64",
              "```", ""]

    # Runs
    lines += ["## Runs", ""]
    runs = defaultdict(list)
    for e in rows:
        runs[e["run"]].append(e)
    rr = []
    for run, es in sorted(runs.items()):
        e0 = es[0]
        v = e0.get("versions", {})
        n_ok = sum(1 for e in es if ok(e) and e.get("op") in OPS)
        n_other = sum(1 for e in es if not ok(e) and e.get("op") in OPS)
        gf = e0.get("blas_fp32_gflops")
        rr.append((f"`{run}`", e0.get("device", "?"), e0.get("datetime", "")[:16],
                   f"torch {v.get('torch')}, triton {v.get('triton')}, pykeops {v.get('pykeops')}, "
                   f"scipy {v.get('scipy')}",
                   f"{gf:.0f}" if gf else "-", n_ok, n_other))
    lines += [md_table(("file", "device", "date (UTC)", "versions", "fp32 matmul GFLOP/s (same run)",
                        "cases timed", "cases recorded as not run"), rr), ""]
    if any(e.get("smoke") for e in rows):
        lines += ["> WARNING: some rows come from a BENCH_SMOKE=1 debug run (sizes divided by 64).", ""]

    steps = [e for e in rows if e.get("op") == "default_step" and ok(e)]
    if steps:
        lines += ["## The default training step", "",
                  "`bench/bench_default_step.py`: what `python train.py` runs per step (stream bodies at `lite`, "
                  "1,723 vertices, batch 2, default configs, compiled encoder and decoder). Target: 1.5 s on 2 "
                  "CPU cores.", "",
                  md_table(("run", "device", "best of rounds", "median of rounds", "first step (compiles)"),
                           [(f"`{e['run']}`", e.get("device", "?"), fmt_s(e["median_s"]),
                             fmt_s(e["median_of_rounds_s"]), fmt_s(e.get("first_step_s"))) for e in steps]), ""]

    # Headline numbers
    lines += ["## Headline numbers", ""]
    lines += ["### softmax_attend forward + backward, N = M = 8192, C = 256, B = 1", ""]
    hr = []
    for run in sorted(runs):
        by_p = idx.get((run, "softmax_attend", "fwd+bwd", 256, 1), {}).get(8192, {})
        base = by_p.get("torch")
        for prov in PROVIDERS:
            e = by_p.get(prov)
            if e is None:
                continue
            ratio = "-"
            if ok(e) and base is not None and ok(base):
                ratio = f"{e['median_s'] / base['median_s']:.2f}×"
            hr.append((f"`{run}`", prov, cell_time(e), ratio, cell_mem(e),
                       f"{e['pairs_per_s']:.3g}" if ok(e) else "-",
                       f"{e['tflops'] * 1e3:.1f}" if ok(e) else "-"))
    lines += [md_table(("run", "provider", "best time", "× dense torch", "peak memory", "pairs/s",
                        "GFLOP/s"), hr) if hr else "(not measured yet)", ""]

    lines += ["### chamfer at 100,000 points (forward + backward, B = 1)", ""]
    hr = []
    for run in sorted(runs):
        by_p = idx.get((run, "chamfer", "fwd+bwd", 3, 1), {}).get(100_000, {})
        for prov in PROVIDERS:
            e = by_p.get(prov)
            if e is None:
                continue
            need = e.get("predicted_mb")
            hr.append((f"`{run}`", prov, cell_time(e), cell_mem(e),
                       fmt_mb(need) if prov == "torch" else "-", e.get("status", "")[:90]))
    lines += [md_table(("run", "provider", "best time", "peak memory", "predicted dense need", "status"), hr)
              if hr else "(not measured yet)", "",
              "Dense torch builds the (N, M, 3) difference tensor: 28 bytes per pair at its peak "
              "(differences, their squares, the sums), i.e. 1e10 pairs x 28 B = 280 GB at 100k points "
              "(one fp32 N x M matrix alone is 40 GB).", ""]

    # Auto rule
    consts, err = dispatch_constants()
    lines += ["## The auto rule and the data behind it", ""]
    if consts is None:
        lines += [err, ""]
    else:
        lines += ["Current constants in `kernels/dispatch.py` (pair counts B·N·M):", "",
                  md_table(("constant", "value", "as N = M at B = 1"),
                           [(k, fmt_n(v), f"{math.isqrt(v):,}" if v else "-") for k, v in consts.items()]), "",
                  "Rule: CUDA → dense torch up to `CUDA_DENSE_MAX_PAIRS`, else triton (chunked without it); "
                  "CPU softmax family → dense torch up to `CPU_DENSE_MAX_PAIRS`, else chunked; CPU "
                  "nearest/chamfer → dense torch up to `CPU_NEAREST_DENSE_MAX_PAIRS`, else kdtree.", ""]
    lines += ["Provenance: the constants were set from the quietest `make bench` run of the session that "
              "wrote them (its numbers are quoted in the comment above the constants in "
              "`kernels/dispatch.py`). Runs taken on a busier machine (lower BLAS rate in the Runs "
              "table) scatter the softmax dense/chunked time ratios by up to several-fold at "
              "single-round sizes; the memory columns, the KeOps/kdtree numbers and the "
              "nearest-neighbour crossover are stable across runs. Re-run `make bench` on a quiet "
              "machine before moving a threshold.", ""]
    sm_table, sm_first = softmax_crossover(idx)
    if sm_table:
        lines += ["### Softmax family: dense torch vs chunked, forward + backward", ""]
        r = []
        for run, op, c, b, n, t, ch in sm_table:
            r.append((f"`{run}`", op, c, b, fmt_n(n), fmt_n(b * n * n), cell_time(t), cell_time(ch, t),
                      cell_mem(t), cell_mem(ch)))
        lines += [md_table(("run", "op", "C", "B", "N = M", "pairs", "dense time", "chunked time (× dense)",
                            "dense peak", "chunked peak"), r), ""]
        if sm_first:
            lines += ["Smallest measured pair count from which chunked is no slower than dense: " +
                      "; ".join(f"{op} C={c} B={b}: {fmt_n(p)}"
                                for (_run, op, c, b), p in sorted(sm_first.items())) + ".", ""]
        else:
            lines += ["Chunked is slower than dense at every measured size where dense ran.", ""]
    nn_table, nn_first = nearest_crossover(idx)
    if nn_table:
        lines += ["### Nearest / chamfer: dense torch vs kdtree (and keops, chunked), forward + backward", ""]
        r = []
        for run, b, n, t, kd, ke, ch in nn_table:
            r.append((f"`{run}`", b, fmt_n(n), fmt_n(2 * b * n * n), cell_time(t), cell_time(kd, t),
                      cell_time(ke, t), cell_time(ch, t), cell_mem(t), cell_mem(kd)))
        lines += [md_table(("run", "B", "N = M", "pairs (both directions)", "dense", "kdtree (× dense)",
                            "keops (× dense)", "chunked (× dense)", "dense peak", "kdtree peak"), r), ""]
        if nn_first:
            lines += ["Smallest measured size from which kdtree is no slower than dense (B·N·M): " +
                      "; ".join(f"B={b}: {fmt_n(p)}" for (run, b), p in sorted(nn_first.items())) + ".", ""]

    # Per-op tables
    lines += ["## All results", "",
              "Cells: best time per call, (× dense torch); skipped cases say why (`needs X GB` is the "
              "predicted dense footprint against this shared machine's per-case budget; `too slow` is "
              "the predicted time per call against the suite's cap). Throughput tables: pairs/s, and "
              "GFLOP/s of the matmul parts with the fraction of the hardware limit.", ""]
    for op in OPS:
        keys = sorted(k for k in idx if k[1] == op)
        if not keys:
            continue
        lines += [f"### {op}", ""]
        for key in keys:
            run, _, mode, c, b = key
            by_n = idx[key]
            provs = [p for p in PROVIDERS if any(p in by_n[n] for n in by_n)]
            t_rows, m_rows, x_rows = [], [], []
            for n in sorted(by_n):
                base = by_n[n].get("torch")
                t_rows.append([fmt_n(n)] + [cell_time(by_n[n].get(p), base) for p in provs])
                m_rows.append([fmt_n(n)] + [cell_mem(by_n[n].get(p)) for p in provs])
                xr = [fmt_n(n)]
                for p in provs:
                    e = by_n[n].get(p)
                    if e is None or not ok(e):
                        xr.append("")
                        continue
                    s = f"{e['pairs_per_s']:.3g} pairs/s"
                    lim = limit_desc(e)
                    if lim:
                        s += f", {e['tflops'] * 1e3:.1f} GFLOP/s ({100 * lim[0]:.0f}%)"
                    xr.append(s)
                x_rows.append(xr)
            title = f"#### {op}, {mode}, C = {c}, B = {b} (`{run}`)"
            lines += [title, "", "Time:", "", md_table(["N = M"] + provs, t_rows), "",
                      "Peak memory:", "", md_table(["N = M"] + provs, m_rows), "",
                      "Throughput:", "", md_table(["N = M"] + provs, x_rows), ""]
            some = next((e for n in by_n for e in by_n[n].values() if limit_desc(e)), None)
            if some:
                lines += [f"Percentages are {limit_desc(some)[1]}.", ""]

    # Plots
    lines += ["## Plots", "", "Log-log, one line per provider; dotted crosses are the predicted "
              "footprint of cases skipped for memory.", ""]
    lines += [f"- [{p}]({plot_rel}/{p})" for p in plot_names] or ["(none)"]
    lines += [""]

    # Limits
    lines += ["## Hardware limits used", "",
              "- CPU: the fp32 matmul rate (`torch.mm`, 2048², best of 5) measured at the start of the "
              "same run, in the Runs table; percentages of it are upper bounds on what any "
              "provider can reach (the exponentials are not counted).",
              "- H100 (NVIDIA H100 datasheet, nvidia.com/en-us/data-center/h100, and the "
              "Hopper whitepaper table at glennklockwood.com/garden/processors/h100; exp rate from "
              "FlashAttention-3, arXiv 2407.08608 §3.2):", ""]
    lines += [md_table(("form", "BF16 TC TFLOP/s", "TF32 TC", "FP32 (no TC)", "HBM TB/s", "exp/s"),
                       [(k, v["bf16_tc_tflops"], v["tf32_tc_tflops"], v["fp32_tflops"], v["hbm_tbs"],
                         f"{v['exp_per_s']:.1e}" if v["exp_per_s"] else "-") for k, v in H100_LIMITS.items()]), ""]
    return "\n".join(lines) + "\n"


@dataclass
class ReportConfig:
    results: str = field(default=os.path.join(HERE, "results"), metadata={"help": "folder of benchmark JSON"})
    out: str = field(default=os.path.join(HERE, "RESULTS.md"), metadata={"help": "the report to write"})
    plots: str = field(default=os.path.join(HERE, "plots"), metadata={"help": "folder for the plots"})


def main(argv=None):
    args = parse_dataclass(ReportConfig, argv, description=__doc__)
    rows = load(args.results)
    names = plots(index(rows), args.plots)
    rel = os.path.relpath(args.plots, os.path.dirname(os.path.abspath(args.out)))
    write_text(args.out, render(rows, names, rel))
    print(f"wrote {args.out} ({len(rows)} results, {len(names)} plots in {args.plots})")


if __name__ == "__main__":
    main()
