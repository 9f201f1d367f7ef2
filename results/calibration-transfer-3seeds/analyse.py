"""How much of what a trained adapter gets wrong on another source is calibration, and how much is reading.

    python results/calibration-transfer-3seeds/analyse.py readings.json.gz [--trained NAME] > analysis.md

For the base model and each adapter in ``readings.json`` (from ``readings.py``), the slot's distribution p is
recalibrated by a map fitted on the training split's items alone, never on an evaluated one:

- ``temperature``: softmax(log p / T), T fitted to the training items' mean JSD;
- ``biases``: softmax(log p + b), a bias per label fitted the same way;
- ``both``: softmax(log p / T + b);
- ``prior mean``: the biases that make the mean prediction over the training items equal the label prior.

Each row gives the mean ± std over the adapters of the JSD, the label prior's JSD, the JSD of the row's own
mean prediction used as a constant (``own``) and the input-dependence gap (``own`` minus JSD; CI from the paired
item bootstrap pooled over the adapters, * where it excludes 0), and the difference to the label prior.
"""
import argparse
import gzip
import json

import torch

from shala import metrics

TRANSFER = {"ambient": ["ambient"], "pk2019": ["pk2019"],
            "VariErrNLI": ["varierr-train", "varierr-dev", "varierr-test"]}
SETS = {"training items": ["train"], "held-out": ["held-out"], **TRANSFER}
MAPS = ["none", "temperature", "biases", "both", "prior mean"]


def stacked(reading: dict, parts: list) -> tuple:
    q = torch.cat([torch.tensor(reading[s]["q"], dtype=torch.float64) for s in parts])
    p = torch.cat([torch.tensor(reading[s]["p"], dtype=torch.float64) for s in parts])
    return q, p


def calibrate(name: str, p, params) -> torch.Tensor:
    log_t, b = params
    z = p.clamp_min(1e-12).log()
    if name in ("temperature", "both"):
        z = z / log_t.exp()
    if name in ("biases", "both", "prior mean"):
        z = z + b
    return torch.softmax(z, -1)


def fit(name: str, p, q, prior) -> tuple:
    log_t, b = torch.zeros((), dtype=torch.float64), torch.zeros(p.shape[1], dtype=torch.float64)
    if name == "prior mean":  # fixed point: shift each label's bias by the log ratio of target to mean
        for _ in range(500):
            b = b + prior.log() - calibrate(name, p, (log_t, b)).mean(0).log()
        return log_t, b - b.mean()
    if name != "none":
        log_t.requires_grad_(), b.requires_grad_()
        opt = torch.optim.LBFGS([log_t, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = metrics.jsd_per_item(q, calibrate(name, p, (log_t, b))).mean()
            loss.backward()
            return loss

        opt.step(closure)
    return log_t.detach(), b.detach()


def row(label: str, q, ps, prior) -> str:
    """``ps`` [S, n, K]: one prediction per adapter."""
    jsd = torch.stack([metrics.jsd_per_item(q, p) for p in ps])
    own = torch.stack([metrics.jsd_per_item(q, p.mean(0, keepdim=True).expand_as(p)) for p in ps])
    base = metrics.jsd_per_item(q, prior.expand_as(q)).unsqueeze(0)
    gap = metrics.format_difference(metrics.paired_difference(own, jsd))
    vs = metrics.format_difference(metrics.paired_difference(jsd, base))
    acc = torch.stack([(p.argmax(1) == q.argmax(1)).double().mean() for p in ps])
    mean = ps.mean((0, 1)).tolist()

    m = jsd.mean(1)
    spread = f" ± {m.std(unbiased=True):.4f}" if len(ps) > 1 else ""
    return (f"| {label} | {m.mean():.4f}{spread} | {own.mean():.4f} | {gap} | {vs} | "
            f"{acc.mean():.3f} | {' / '.join(f'{x:.2f}' for x in mean)} |")


def main(path: str, name: str = "the default") -> None:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        data = json.load(f)
    prior = torch.tensor(data["prior"], dtype=torch.float64)
    trained = [k for k in data if k.endswith("final")]
    models = {"base model": ["base"], **({f"trained ({name}, seeds 0, 1, 2)": trained} if trained else {})}
    print(f"Label prior (training split): {' / '.join(f'{x:.3f}' for x in prior.tolist())} "
          f"({', '.join(data['label_names'])}).\n")
    train_q = stacked(data["base"], ["train"])[0]
    constant = torch.tensor(metrics.best_constant(train_q), dtype=torch.float64)
    keys = trained or ["base"]  # with no adapter read, the base model stands against the constant
    who = ("the trained adapters", "adapters'") if trained else ("the base model", "base model's")
    print("**The JSD-best constant** (fitted on the training items: "
          f"{' / '.join(f'{x:.3f}' for x in constant.tolist())}) against the label prior and {who[0]}\n")
    print(f"| set | constant's JSD | label prior's JSD | {who[1]} JSD | {who[1]} Δ vs the constant [95% CI] |")
    print("|---|---|---|---|---|")
    for title, parts in SETS.items():
        q = stacked(data["base"], parts)[0]
        jsd = torch.stack([metrics.jsd_per_item(q, stacked(data[k], parts)[1]) for k in keys])
        const = metrics.jsd_per_item(q, constant.expand_as(q))
        print(f"| {title} | {const.mean():.4f} | {metrics.jsd_per_item(q, prior.expand_as(q)).mean():.4f} | "
              f"{jsd.mean():.4f} | {metrics.format_difference(metrics.paired_difference(jsd, const.unsqueeze(0)))} |")
    print()
    for model, keys in models.items():
        maps = {}
        for key in keys:
            q, p = stacked(data[key], ["train"])
            maps[key] = {name: fit(name, p, q, prior) for name in MAPS}
        for name in MAPS[1:]:
            t = torch.stack([maps[k][name][0].exp() for k in keys])
            b = torch.stack([maps[k][name][1] for k in keys])
            temps = ", ".join(f"{x:.2f}" if x < 1e3 else "over 1000 (a constant)" for x in t.tolist())
            print(f"- {model}, {name}: T {temps}; biases "
                  + "; ".join(" / ".join(f"{x:+.2f}" for x in bb) for bb in b.tolist()))
        print()
        for title, parts in SETS.items():
            q = stacked(data[keys[0]], parts)[0]
            hits = (q.argmax(1) == prior.argmax()).double().mean()
            print(f"**{model}, {title}** (n = {len(q)}; label prior: JSD "
                  f"{metrics.jsd_per_item(q, prior.expand_as(q)).mean():.4f}, accuracy {hits:.3f})\n")
            print("| map fitted on the training items | JSD | own mean's JSD | gap [95% CI] | Δ vs label prior "
                  "[95% CI] | accuracy | mean prediction |")
            print("|---|---|---|---|---|---|---|")
            for name in MAPS:
                ps = []
                for key in keys:
                    qq, p = stacked(data[key], parts)
                    assert torch.equal(qq, q), f"{key}: the {title} items differ"
                    ps.append(calibrate(name, p, maps[key][name]))
                print(row(name, q, torch.stack(ps), prior))
            print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("readings", help="readings.py's output (.json or .json.gz)")
    parser.add_argument("--trained", default="the default", help="what the adapters were trained with, for titles")
    args = parser.parse_args()
    main(args.readings, args.trained)
