"""The README's "## Drop-in loss" example runs as written and the divergence falls.

The block runs in a fresh interpreter (as a user would paste it) with
``TRITON_INTERPRET=1``, so ``shala.LabelJSDLoss`` takes the Triton path on CPU;
``OMP_WAIT_POLICY=PASSIVE`` stops PyTorch's idle OpenMP threads from spinning
against the interpreter on a small machine.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def drop_in_loss_block() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Drop-in loss\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, "README.md has no '## Drop-in loss' section"
    blocks = re.findall(r"```python\n(.*?)```", match.group(1), flags=re.S)
    assert len(blocks) == 1, f"expected one python block in '## Drop-in loss', found {len(blocks)}"
    return blocks[0]


def test_drop_in_loss_example_trains():
    code = drop_in_loss_block() + "\nimport json as _json\nprint('HISTORY=' + _json.dumps(history))\n"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    env.pop("SHALA_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=README.parent
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("HISTORY="))
    history = json.loads(line[len("HISTORY="):])
    assert len(history) >= 10 and all(math.isfinite(v) for v in history)
    assert history[-1] < 0.2 * history[0], history
    assert "JS divergence" in proc.stdout
