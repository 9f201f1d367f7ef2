#!/bin/bash
# Per-step seconds of the three-item chat prefix read by the base model once (--frozen-head), beside the prefix encoded every forward and no prefix; one process at a time.
cd "$(dirname "$0")/../../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
uptime
for arm in "default:" "fs3cp:--few-shot 3 --common-prefix" "fs3-frozen:--few-shot 3 --frozen-head"; do
  name=${arm%%:*}; opts=${arm#*:}
  rm -rf runs/timing/$name && mkdir -p runs/timing
  .venv/bin/python -m shala.train --steps 12 --no-eval-before --no-eval-after --no-progress --no-plot --output-dir runs/timing/$name $opts > runs/timing/$name.log 2>&1
  .venv/bin/python - "$name" <<'PY'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(f"runs/timing/{sys.argv[1]}/metrics.jsonl")][2:]
g = st.median(r["time_generation"] for r in rows); u = st.median(r["time_update"] for r in rows)
print(f"{sys.argv[1]}: steps 3-12 median sampling {g:.2f} s, update {u:.2f} s, total {g+u:.2f} s")
PY
done
uptime
