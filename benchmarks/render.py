"""Render every benchmark result into ``benchmarks/RESULTS.md`` and ``benchmarks/results/plot.png``.

Run: ``python -m benchmarks.render [--results DIR] [--out FILE.md] [--plot FILE.png]``.

Reads every ``<results>/*/*.json`` written by ``benchmarks._common.write_results``
(one folder per device) and writes one section per benchmark and device: the
device, commit and date of the run above its table, then the rest of the run's
environment, then the rows. The plot is the label reward and loss time against the
number of rows N, one line per vocabulary size V and implementation, from the
``bench_rewards.json`` results (the largest K measured, bf16 where the fused kernel
was timed and fp32 elsewhere; one row of panels per device and normalisation).
Where a device's results have no fused timings (CPU: Triton runs there only under
its interpreter) the panels show the reference against the compiled reference, and
the titles say so.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from benchmarks._common import RESULTS, markdown_table

ROOT = Path(__file__).resolve().parent
HEADLINE = ("device", "commit", "date")
OPS = ("reward", "loss_fwd", "loss_fwd_bwd")
IMPL_STYLE = {"fused": "-", "reference": "--", "compiled": ":"}


def load_results(results_dir: Path) -> list:
    """Every result file under ``results_dir/*/``, sorted by benchmark then device folder."""
    out = []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        data = json.loads(path.read_text())
        if not {"benchmark", "environment", "rows"} <= set(data):
            continue  # not a benchmark result
        data["path"] = path
        out.append(data)
    return sorted(out, key=lambda d: (d["benchmark"], d["path"].parent.name))


def columns_of(name: str, rows: list) -> list:
    """The benchmark's own column order where its module says it, else the rows' keys; empty columns dropped."""
    try:
        columns = list(importlib.import_module(f"benchmarks.{name}").COLUMNS)
    except (ImportError, AttributeError):
        columns = []
    for row in rows:
        columns += [k for k in row if k not in columns and not isinstance(row[k], (list, dict))]
    return [c for c in columns if any(row.get(c) not in (None, "") for row in rows)]


def _fmt_env(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def section(result: dict) -> str:
    env, rows, name = result["environment"], result["rows"], result["benchmark"]
    lines = [f"## {name} · {env.get('device', 'unknown device')}", ""]
    lines.append(" · ".join(f"{k}: {env.get(k, 'unknown')}" for k in HEADLINE))
    lines.append("")
    rest = [f"{k}: {_fmt_env(v)}" for k, v in env.items() if k not in HEADLINE and v is not None]
    if rest:
        lines += ["Run: " + " · ".join(rest), ""]
    lines.append(markdown_table(rows, columns_of(name, rows)))
    return "\n".join(lines) + "\n"


def _fused_measured(rows: list) -> bool:
    return any(r.get("impl") == "fused" and r.get("median_ms") is not None for r in rows)


def plot_dtype(rows: list) -> str:
    """The dtype a device's panels show: bf16 where the fused kernel was timed (what LLM
    training feeds it, and the dtype of the targets), else fp32 (every CPU op has it)."""
    timed = sorted({x["dtype"] for x in rows if x.get("median_ms") is not None})
    preferred = "bf16" if _fused_measured(rows) else "fp32"
    return preferred if preferred in timed else timed[0]


def plot_title(fused_measured: bool) -> str:
    if fused_measured:
        return "Label reward and JSD loss: time vs N per V, fused vs reference"
    return ("Label reward and JSD loss: time vs N per V, reference vs compiled reference "
            "(CPU-only results: the fused Triton path is unmeasured)")


def plot_rewards(results: list, out_png: Path):
    """Time vs N per V for each ``bench_rewards`` result; returns the PNG path, or None without such results."""
    # Whole-grid runs only (a device's bench_rewards.json): filtered re-runs stay in the tables.
    runs = [
        r for r in results
        if r["benchmark"] == "bench_rewards" and r["path"].name == "bench_rewards.json"
        and any(x.get("median_ms") for x in r["rows"])
    ]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    panels = []  # (device, fused measured, normalize, dtype, K, timed rows)
    for run in runs:
        timed = [x for x in run["rows"] if x.get("median_ms") is not None]
        dtype = plot_dtype(run["rows"])
        k = max(x["K"] for x in timed if x["dtype"] == dtype)
        for normalize in sorted({x["normalize"] for x in timed}):
            rows = [x for x in timed if x["dtype"] == dtype and x["K"] == k and x["normalize"] == normalize]
            panels.append((run["environment"]["device"], _fused_measured(run["rows"]), normalize, dtype, k, rows))
    fig, axes = plt.subplots(len(panels), len(OPS), figsize=(4.2 * len(OPS), 3.3 * len(panels)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axrow, (device, fused, normalize, dtype, k, rows) in zip(axes, panels):
        vocab = sorted({x["V"] for x in rows})
        sizes = sorted({x["N"] for x in rows})
        for ax, op in zip(axrow, OPS):
            for i, v in enumerate(vocab):
                for impl, style in IMPL_STYLE.items():
                    pts = sorted((x["N"], x["median_ms"]) for x in rows
                                 if (x["op"], x["V"], x["impl"]) == (op, v, impl))
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", ms=3, lw=1.2, color=colors[i % len(colors)],
                                label=f"{impl}, V={v}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(sizes, [str(n) for n in sizes])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("N (rows)", fontsize=8)
            ax.set_title(f"{op} · {normalize} · {dtype} · K={k}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
        what = "fused vs reference" if fused else "fused unmeasured"
        axrow[0].set_ylabel(f"{device}\n({what})\nmedian ms", fontsize=8)
    fig.suptitle(plot_title(any(p[1] for p in panels)), fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def render(results_dir=RESULTS, out_md=ROOT / "RESULTS.md", out_png=RESULTS / "plot.png") -> Path:
    results = load_results(Path(results_dir))
    out_md, png = Path(out_md), plot_rewards(results, Path(out_png))
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `python -m benchmarks.render` from `{_rel(Path(results_dir), out_md.parent)}/*/*.json`; "
        "rerun it after a benchmark instead of editing this file. Each table names the device, commit and "
        "date of the run that produced it; numbers from different devices or loads are not comparable.",
        "",
    ]
    if png is not None:
        fused = any(_fused_measured(r["rows"]) for r in results if r["benchmark"] == "bench_rewards")
        lines += [f"![{plot_title(fused)}]({_rel(png, out_md.parent)})", "", f"*{plot_title(fused)}.*", ""]
    else:
        lines += ["No bench_rewards timings: no plot.", ""]
    if not results:
        lines += ["No results yet.", ""]
    lines += [section(r) for r in results]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines))
    return out_md


def _rel(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS), help="folder of <device>/<benchmark>.json files")
    parser.add_argument("--out", default=str(ROOT / "RESULTS.md"), help="the Markdown file written")
    parser.add_argument("--plot", default=None, help="the PNG written (default: plot.png in --results)")
    args = parser.parse_args(argv)
    plot = args.plot or str(Path(args.results) / "plot.png")
    path = render(args.results, args.out, plot)
    print(f"wrote {path} and {plot}" if Path(plot).is_file() else f"wrote {path} (no bench_rewards timings: no plot)")
    return path


if __name__ == "__main__":
    main()
