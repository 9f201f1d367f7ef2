"""What each arm of the sweep changed on each set: the model's overall label shape, or its reading of the items.

    python results/sweep-decomposition/decompose.py > results/sweep-decomposition/decomposition.md

Reads every three-seed ``results/*/comparison.json``. For a trained method on a set, ``own`` is the JSD of its own
mean prediction used as a constant (the JSD plus the input-dependence gap, each averaged over the seeds), so

    JSD = own - gap,    and against the folder's reference method:    Δ JSD = Δ own - Δ gap.

``Δ own`` is what moving the mean prediction alone did (the label shape); ``-Δ gap`` is what the per-item reading
did. An arm's cells read again by a later folder (the same JSD to 1e-9) are counted once, against the reference of
the first folder, by name, that holds them; so is a pair of methods compared both ways round.
"""
import json
import statistics
import sys
from pathlib import Path

from shala.metrics import format_difference

SETS = ("held-out", "ambient", "pk2019")
ROOT = Path(__file__).resolve().parent.parent


def arms():
    """Each three-seed arm on each set: its JSD and gap (with its CI), and both their differences to the reference."""
    seen = set()
    for path in sorted(ROOT.glob("*/comparison.json")):
        data = json.loads(path.read_text())
        if len(data.get("seeds", [])) < 3:
            continue
        for name in SETS:
            block = data["sets"].get(name)
            ref = block and block.get("versus")
            if not ref or ref not in block["methods"]:
                continue
            r = block["methods"][ref]
            for arm, m in block["methods"].items():
                if arm == ref or "input_dependence_gap" not in m:
                    continue
                mine, theirs = round(m["jsd"]["mean"], 9), round(r["jsd"]["mean"], 9)
                keys = {(name, mine), (name, frozenset((mine, theirs)))}  # the arm; the pair, either way round
                if keys & seen:
                    continue
                seen |= keys
                yield dict(folder=path.parent.name, arm=arm, ref=ref, set=name,
                           jsd=m["jsd"]["mean"], gap=m["input_dependence_gap"],
                           d_jsd=m["jsd"]["mean"] - r["jsd"]["mean"],
                           d_gap=m["input_dependence_gap"]["mean"] - r["input_dependence_gap"]["mean"])


def main() -> None:
    rows = list(arms())
    if not rows:
        sys.exit(f"no three-seed comparison.json with input-dependence gaps under {ROOT}")
    print("Over every three-seed arm of the sweep against its folder's reference (Δ = arm minus reference; "
          "own = the JSD of the method's own mean prediction used as a constant; Δ JSD = Δ own - Δ gap).\n")
    print("| set | arms | mean \\|Δ JSD\\| | mean \\|Δ own\\| (label shape) | mean \\|Δ gap\\| (reading) "
          "| corr(Δ JSD, Δ own) | corr(Δ JSD, -Δ gap) | arms with a gap CI wholly above 0 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in SETS:
        r = [x for x in rows if x["set"] == name]
        d_jsd, d_gap = [x["d_jsd"] for x in r], [x["d_gap"] for x in r]
        d_own = [a + b for a, b in zip(d_jsd, d_gap)]
        above = sum(x["gap"]["ci"][0] > 0 for x in r)
        mean_abs = [sum(map(abs, v)) / len(v) for v in (d_jsd, d_own, d_gap)]
        corrs = [statistics.correlation(d_jsd, v) for v in (d_own, [-g for g in d_gap])]
        print(f"| {name} | {len(r)} | {mean_abs[0]:.4f} | {mean_abs[1]:.4f} | {mean_abs[2]:.4f} "
              f"| {corrs[0]:+.2f} | {corrs[1]:+.2f} | {above} |")
    print("\nEach arm, by set (gap with its 95% CI from the paired item bootstrap, * where it excludes 0):\n")
    print("| folder | arm | reference | set | JSD | Δ JSD | Δ own | -Δ gap | gap [95% CI] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in sorted(rows, key=lambda x: (SETS.index(x["set"]), x["folder"], x["arm"])):
        print(f"| {x['folder']} | {x['arm']} | {x['ref']} | {x['set']} | {x['jsd']:.4f} | {x['d_jsd']:+.4f} "
              f"| {x['d_jsd'] + x['d_gap']:+.4f} | {-x['d_gap']:+.4f} | {format_difference(x['gap'])} |")


if __name__ == "__main__":
    main()
