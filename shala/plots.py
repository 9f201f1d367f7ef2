"""PNG plots of a training run: curves from metrics.jsonl, predicted vs human label distributions."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: (metrics.jsonl key, panel title, y-axis label); a panel is drawn where its series varies
CURVES = [("reward", "Reward", "mean reward"),
          ("eval_jsd", "Held-out JS distance (during training)", "JS distance"),
          ("eval_accuracy", "Held-out accuracy (during training)", "accuracy"),
          ("slot_jsd", "JS distance at the answer slot", "JS distance"),
          ("verbal_jsd", "JS distance of the written distribution", "JS distance"),
          ("label_mass_slot", "Probability on the label tokens", "label mass"),
          ("label_share_min", "Least-predicted label at the slot / its training share", "ratio"),
          ("loss", "Loss", "loss"),
          ("reward_format_ok", "Parsable answers", "share"),
          ("zero_std_frac", "Groups with equal rewards", "share"),
          ("kl", "KL to the reference model", "KL"),
          ("clip_frac", "Clipped importance ratios", "share"),
          ("grad_norm", "Gradient norm (before clipping)", "norm"),
          ("lr", "Learning rate", "lr")]


def _read(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _varies(values) -> bool:
    return len(values) > 1 and max(values) - min(values) > 1e-6 * max(1.0, max(abs(v) for v in values))


def curve_panels(rows: list) -> list:
    """``(title, y label, [(step, value)])`` of each quantity in ``rows`` that changes over the run."""
    panels = []
    for key, title, ylabel in CURVES:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts and _varies([v for _, v in pts]):
            panels.append((title, ylabel, pts))
    return panels


def training_curves(metrics_path, out_png) -> Path:
    """A grid of titled panels, one per logged quantity that changes over the run, with a moving average."""
    panels = curve_panels(_read(metrics_path))
    cols = min(4, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.1 * nrows), squeeze=False)
    for ax, (title, ylabel, pts) in zip(axes.flat, panels):
        steps, values = zip(*pts)
        ax.plot(steps, values, lw=0.8, alpha=0.45, color="tab:blue", label="per step")
        k = max(1, len(values) // 15) if title != "Learning rate" else 1  # a moving average of noisy series
        if k > 1:
            smooth = [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, lw=1.8, color="tab:blue", label=f"mean of {k} steps")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if panels and len(panels[0][2]) > 15:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def predictions(before: dict | None, after: dict, out_png, n_items: int = 6) -> Path:
    """Annotators vs before vs after training, side by side, on the most ambiguous held-out items."""
    items = after["predictions"]
    ent = [-sum(x * math.log(x) for x in it["q"] if x > 0) for it in items]
    chosen = sorted(range(len(items)), key=lambda i: -ent[i])[: min(n_items, len(items))]
    base = {it["id"]: it["p"] for it in before["predictions"]} if before else {}
    names = after.get("label_names") or [str(k) for k in range(len(items[0]["q"]))]
    cols = min(3, len(chosen))
    nrows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    width = 0.27
    xs = list(range(len(names)))
    for ax, i in zip(axes.flat, chosen):
        it = items[i]
        ax.bar([x - width for x in xs], it["q"], width, label="annotators", color="0.35")
        if it["id"] in base:
            ax.bar(xs, base[it["id"]], width, label="before training", color="tab:orange")
        ax.bar([x + width for x in xs], it["p"], width, label="after training", color="tab:blue")
        ax.set_xticks(xs, names, fontsize=8, rotation=20 if len(names) > 3 else 0)
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability", fontsize=8)
        label = it.get("text") or str(it["id"])
        ax.set_title("\n".join(textwrap.wrap(label, 60)[:3]), fontsize=7.5, loc="left")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Label distributions on the most ambiguous held-out items", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
