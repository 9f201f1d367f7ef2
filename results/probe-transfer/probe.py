"""Linear probes of the base model's answer-slot hidden states: does the state carry how people split on an item,
on the training source and on the others?

    python results/probe-transfer/probe.py FEATURES.npz > probes.md

Each probe is softmax(W h + b) of one layer's standardized state ``h``, fitted in float64 to the annotators'
distributions (cross-entropy to the soft targets, each fitting source's items weighing 1 in all, L2 on W). Its
layer and L2 strength are chosen by 5-fold cross-validated JSD on the fitting items alone; the items it is
scored on never choose anything, except in B on the training split, whose layer A chose. Three fits:

- A: fitted on the training split, scored on the held-out split and the sets of other sources;
- B: within one source, 5-fold cross-validation, every item scored by the probe fitted without it, at the
  layer A chose, its L2 strength chosen again inside each fold (pk2019 without its MNLI pairs; VariErrNLI,
  MNLI development-matched pairs, is never fitted on);
- C: one transfer source left out, the probe fitted on the training split, CommitmentBank and the other
  transfer source, scored on the one left out.

Each probe is scored beside the training label prior and its own mean prediction used as a constant; the gap
(that constant's JSD minus the probe's, positive where the probe reads the items) carries a paired item-bootstrap
95% CI, * where it excludes 0. Under the table: B's gap on pk2019 against the probe's own mean within each of the
sources it pools.
"""
import argparse

import numpy as np
import torch

from shala import metrics
from shala.compare import summarize_set

FOLDS = 5
L2 = [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 100.0]
TRANSFER = {"ambient": "AmbiEnt (crowd labels)", "pk2019": "pk2019 without MNLI"}


def load(path: str) -> tuple:
    """(sets {name: {"q", "ids", layer: states}}, prior, layer keys); VariErrNLI's three files pooled,
    pk2019 split into its MNLI pairs and the rest."""
    z = np.load(path)
    names = sorted({k.split("/")[0] for k in z.files if "/" in k})
    keys = [f"h{int(i)}" for i in z["layers"]] + ["hfinal"]
    sets = {n: {k.split("/")[1]: z[k] for k in z.files if k.startswith(n + "/")} for n in names}
    pooled = [n for n in names if n.startswith("varierr-")]
    sets["varierr"] = {k: np.concatenate([sets[n][k] for n in pooled]) for k in sets[pooled[0]]}
    for n in pooled:
        del sets[n]
    mnli = np.char.startswith(sets["pk2019"]["ids"].astype(str), "pk2019_mnli")
    sets["pk2019-mnli"] = {k: v[mnli] for k, v in sets["pk2019"].items()}
    sets["pk2019"] = {k: v[~mnli] for k, v in sets["pk2019"].items()}
    return sets, z["prior"], keys


def fit(x: np.ndarray, q: np.ndarray, w: np.ndarray, l2: float, init=None) -> tuple:
    """(W, b, mean, std) of the probe on states ``x`` [n, d], targets ``q`` [n, K], item weights ``w``."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    X = torch.as_tensor((x - mu) / sd, dtype=torch.float64)
    Q, Wt = torch.as_tensor(q, dtype=torch.float64), torch.as_tensor(w / w.sum(), dtype=torch.float64)
    W = torch.zeros(x.shape[1], q.shape[1], dtype=torch.float64) if init is None else init[0].clone()
    b = torch.as_tensor(np.log(np.clip(w @ q / w.sum(), 1e-6, None)), dtype=torch.float64) if init is None \
        else init[1].clone()
    W.requires_grad_(), b.requires_grad_()
    opt = torch.optim.LBFGS([W, b], max_iter=300, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = -(Wt @ (Q * torch.log_softmax(X @ W + b, 1)).sum(1)) + l2 * (W * W).sum()
        value.backward()
        return value

    opt.step(loss)
    return W.detach(), b.detach(), mu, sd


def predict(model: tuple, x: np.ndarray) -> torch.Tensor:
    W, b, mu, sd = model
    return torch.softmax(torch.as_tensor((x - mu) / sd, dtype=torch.float64) @ W + b, 1)


def folds(n: int, seed: int = 0) -> list:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::FOLDS] for i in range(FOLDS)]


def out_of_fold(x, q, w, l2_grid, seed: int = 0) -> dict:
    """{l2: out-of-fold predictions [n, K]} over the L2 grid (warm-started from the weaker penalty)."""
    preds = {l2: torch.empty(len(q), q.shape[1], dtype=torch.float64) for l2 in l2_grid}
    for held in folds(len(q), seed):
        keep = np.setdiff1d(np.arange(len(q)), held)
        model = None
        for l2 in sorted(l2_grid):
            model = fit(x[keep], q[keep], w[keep], l2, init=model)
            preds[l2][held] = predict(model, x[held])
    return preds


def pooled(fit_sets: list, key: str) -> tuple:
    """(states, targets, weights) of the fitting sets stacked, each set's items weighing 1 in all."""
    return (np.concatenate([s[key] for s in fit_sets]), np.concatenate([s["q"] for s in fit_sets]),
            np.concatenate([np.full(len(s["q"]), 1.0 / len(s["q"])) for s in fit_sets]))


def choose(fit_sets: list, keys: list) -> tuple:
    """(layer key, l2, CV JSD) with the lowest weighted 5-fold CV JSD on the fitting items."""
    best = None
    for key in keys:
        x, q, w = pooled(fit_sets, key)
        for l2, p in out_of_fold(x, q, w, L2).items():
            score = float(torch.as_tensor(w) @ metrics.jsd_per_item(torch.as_tensor(q), p)) / w.sum()
            if best is None or score < best[2]:
                best = (key, l2, score)
    return best


def fit_on(fit_sets: list, key: str, l2: float) -> tuple:
    return fit(*pooled(fit_sets, key), l2)


def score(q: np.ndarray, p: torch.Tensor, prior) -> dict:
    """The probe's JSD and accuracy, the gap and the difference to the prior with their CIs, the prior's
    (:func:`shala.compare.summarize_set`, the probe as a method of one seed)."""
    result = {"prior": [float(x) for x in prior],
              "predictions": [{"id": i, "q": qi, "p": pi} for i, (qi, pi) in enumerate(zip(q.tolist(), p.tolist()))]}
    stats = summarize_set("probe", {"probe": [result]}, [], resamples=2000)
    probe, fixed = stats["methods"]["probe"], stats["fixed"]["label prior"]
    gap = probe["input_dependence_gap"]
    return {"n": stats["n"], "jsd": probe["jsd"]["mean"], "own": probe["jsd"]["mean"] + gap["mean"],
            "prior": fixed["jsd"]["mean"], "gap": gap, "vs_prior": probe["vs_label_prior"],
            "accuracy": probe["accuracy"]["mean"], "prior_accuracy": fixed["accuracy"]["mean"]}


def row(label: str, fitted: str, s: dict) -> str:
    return (f"| {label} | {fitted} | {s['n']} | {s['jsd']:.4f} | {s['own']:.4f} | {metrics.format_difference(s['gap'])}"
            f" | {s['prior']:.4f} | {metrics.format_difference(s['vs_prior'])} | {s['accuracy']:.3f}"
            f" | {s['prior_accuracy']:.3f} |")


def subsource_gap(s: dict, p: torch.Tensor) -> str:
    """pk2019 without its MNLI pairs pools four sources of about 100 items each, whose label shapes differ: the
    out-of-fold probe against its own mean prediction within each of them, the part of the gap that telling
    them apart cannot give."""
    q = torch.as_tensor(s["q"], dtype=torch.float64)
    group = np.asarray([i.split("_")[1] for i in s["ids"].astype(str)])
    own = p.clone()
    for g in np.unique(group):
        own[group == g] = p[group == g].mean(0)
    d = metrics.paired_difference(metrics.jsd_per_item(q, own)[None], metrics.jsd_per_item(q, p)[None])
    return (f"B on pk2019, the gap against the probe's own mean within each of its sources "
            f"({', '.join(np.unique(group))}): {metrics.format_difference(d)}")


def main(path: str) -> None:
    sets, prior, keys = load(path)
    names = {"held-out": "held-out (same source)", **TRANSFER, "pk2019-mnli": "pk2019's MNLI pairs",
             "varierr": "VariErrNLI"}
    print("| scored on | probe fitted on (layer, L2) | items | probe JSD | own mean | gap [95% CI] | label prior"
          " | probe - prior [95% CI] | accuracy | prior's accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    key, l2, cv = choose([sets["train"]], keys)  # A
    model = fit_on([sets["train"]], key, l2)
    for name, label in names.items():
        print(row(label, f"A: training split ({key[1:]}, {l2:g}; CV JSD {cv:.4f})", score(
            sets[name]["q"], predict(model, sets[name][key]), prior)), flush=True)

    parts = []
    layer = key  # B: the layer the training split chose; the L2 strength chosen again within each fold
    for name, label in {"train": "training split", **TRANSFER}.items():
        s = sets[name]
        p = torch.empty(len(s["q"]), s["q"].shape[1], dtype=torch.float64)
        chosen = []
        for held in folds(len(s["q"]), seed=1):
            rest = {k: v[np.setdiff1d(np.arange(len(s["q"])), held)] for k, v in s.items()}
            _, l2, _ = choose([rest], [layer])
            chosen.append(f"{l2:g}")
            p[held] = predict(fit_on([rest], layer, l2), s[layer][held])
        fitted = f"B: the same source, out of fold ({layer[1:]}, {', '.join(chosen)})"
        print(row(label, fitted, score(s["q"], p, prior)), flush=True)
        if name == "pk2019":
            parts.append(subsource_gap(s, p))

    extra = [sets["train"], sets["cb"]]  # C
    for left, other in (("ambient", "pk2019"), ("pk2019", "ambient")):
        key, l2, cv = choose(extra + [sets[other]], keys)
        model = fit_on(extra + [sets[other]], key, l2)
        for name in (left, "varierr"):
            print(row(names[name], f"C: training split, CB, {TRANSFER[other]} ({key[1:]}, {l2:g})",
                      score(sets[name]["q"], predict(model, sets[name][key]), prior)), flush=True)

    print()
    print("\n".join(parts))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("features")
    args = parser.parse_args()
    main(args.features)
