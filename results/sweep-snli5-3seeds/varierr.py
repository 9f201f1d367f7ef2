"""VariErrNLI (488 MNLI dev-matched pairs, evaluated only) for each arm's adapters: JSD, vs the arm's training
prior, vs the other arm, and the input-dependence gap, with paired item bootstraps (shala.metrics).

    python varierr.py ROOT ARM [ARM ...]   # reads ROOT/ARM/seed-S/varierr-{split}.json written by shala.evaluate
"""
import json, sys
import torch
from shala import metrics

root, arms = sys.argv[1], sys.argv[2:]
SPLITS = ("train", "dev", "test")
per = {}
for arm in arms:
    rows = []
    for seed in (0, 1, 2):
        items = []
        for s in SPLITS:
            items += json.load(open(f"{root}/{arm}/seed-{seed}/varierr-{s}.json"))["predictions"]
        rows.append(items)
    ids = [r["id"] for r in rows[0]]
    assert all([r["id"] for r in x] == ids for x in rows)
    q = torch.tensor([r["q"] for r in rows[0]], dtype=torch.float64)
    p = torch.tensor([[r["p"] for r in x] for x in rows], dtype=torch.float64)  # [S, n, K]
    prior = torch.tensor(json.load(open(f"{root}/{arm}/seed-0/eval_after.json"))["prior"], dtype=torch.float64)
    jsd = torch.stack([metrics.jsd_per_item(q, p[s]) for s in range(3)])
    pj = metrics.jsd_per_item(q, prior.expand_as(q))[None]
    own = torch.stack([metrics.jsd_per_item(q, p[s].mean(0).expand_as(q)) for s in range(3)])
    acc = [(p[s].argmax(-1) == q.argmax(-1)).double().mean().item() for s in range(3)]
    per[arm] = dict(ids=ids, q=q, jsd=jsd)
    print(f"{arm}: n = {len(ids)}, JSD {jsd.mean(1).mean():.4f} ± {jsd.mean(1).std():.4f} "
          f"(seeds {', '.join(f'{x:.4f}' for x in jsd.mean(1).tolist())}); "
          f"prior {[round(x, 3) for x in prior.tolist()]} scores {pj.mean():.4f}")
    print(f"  vs its prior {metrics.format_difference(metrics.paired_difference(jsd, pj))}; gap (own mean - model) "
          f"{metrics.format_difference(metrics.paired_difference(own, jsd))}; accuracy {sum(acc) / 3:.3f} "
          f"(prior {(prior.argmax() == q.argmax(-1)).double().mean().item():.3f}); mean prediction "
          f"{[round(x, 3) for x in p.mean((0, 1)).tolist()]}")
if len(arms) > 1:
    a, b = arms[1], arms[0]
    assert per[a]["ids"] == per[b]["ids"]
    print(f"{a} - {b}: {metrics.format_difference(metrics.paired_difference(per[a]['jsd'], per[b]['jsd']))}")
