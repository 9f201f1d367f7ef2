"""PNG plots of a training run: curves from metrics.jsonl, predicted vs human label distributions."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = [("reward", "reward"), ("slot_jsd", "JS distance at the slot"), ("loss", "loss"),
          ("reward_format_ok", "share of parsable answers"), ("zero_std_frac", "share of zero-std groups"),
          ("kl", "KL to reference")]


def _read(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def training_curves(metrics_path, out_png) -> Path:
    rows = _read(metrics_path)
    panels = [(k, t) for k, t in CURVES if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.6 * max(1, len(panels)), 3), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]
        if pts:
            ax.plot(*zip(*pts), lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def predictions(before: dict | None, after: dict, out_png, n_items: int = 6) -> Path:
    """Bars of q (annotators), p before and p after training, on the most ambiguous held-out items."""
    import math

    items = after["predictions"]
    ent = [-sum(x * math.log(x) for x in it["q"] if x > 0) for it in items]
    chosen = sorted(range(len(items)), key=lambda i: -ent[i])[: min(n_items, len(items))]
    base = {it["id"]: it["p"] for it in before["predictions"]} if before else {}
    names = after.get("label_names") or [str(k) for k in range(len(items[0]["q"]))]
    fig, axes = plt.subplots(1, len(chosen), figsize=(3 * len(chosen), 2.8), squeeze=False)
    width = 0.27
    for ax, i in zip(axes[0], chosen):
        it = items[i]
        xs = range(len(names))
        ax.bar([x - width for x in xs], it["q"], width, label="annotators")
        if it["id"] in base:
            ax.bar(list(xs), base[it["id"]], width, label="before")
        ax.bar([x + width for x in xs], it["p"], width, label="after")
        ax.set_xticks(list(xs), [n[:8] for n in names], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(str(it["id"])[:18], fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
