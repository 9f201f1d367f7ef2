"""Rebuild shala/data_files/chaosnli_snli_subset.jsonl from the ChaosNLI v1.0 release.

usage: python tools/bundle_chaosnli.py path/to/chaosNLI_snli.jsonl [--rest OUT.jsonl]

Keeps 1,000 of the 1,514 SNLI-part lines, chosen by the SHA-256 of their uid
(so the choice does not depend on the file's order), unchanged and in file order.
``--rest`` also writes the other 514 lines: items SHALA's default run never sees.
"""

import argparse
import hashlib
import json
from pathlib import Path

N = 1000
OUT = Path(__file__).resolve().parents[1] / "shala" / "data_files" / "chaosnli_snli_subset.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="chaosNLI_snli.jsonl of the ChaosNLI v1.0 release")
    ap.add_argument("--rest", default=None, help="also write the lines not bundled to this file")
    args = ap.parse_args()
    lines = [line for line in Path(args.source).read_text(encoding="utf-8").splitlines() if line.strip()]
    uids = [json.loads(line)["uid"] for line in lines]
    keep = set(sorted(range(len(lines)), key=lambda i: hashlib.sha256(uids[i].encode()).hexdigest())[:N])
    OUT.write_text("".join(lines[i] + "\n" for i in range(len(lines)) if i in keep), encoding="utf-8")
    print(f"wrote {len(keep)} of {len(lines)} rows to {OUT}")
    if args.rest:
        rest = [lines[i] + "\n" for i in range(len(lines)) if i not in keep]
        Path(args.rest).write_text("".join(rest), encoding="utf-8")
        print(f"wrote the other {len(rest)} rows to {args.rest}")


if __name__ == "__main__":
    main()
