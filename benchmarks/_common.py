"""Shared helpers for the benchmark scripts: device naming, environment, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str | torch.device = "cpu") -> str:
    """Human-readable name of the device that produced a number (GPU model or CPU model + cores)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def git_commit() -> str:
    """The checkout's commit; ``SHALA_COMMIT`` names it where the tree travels without ``.git``."""
    if os.environ.get("SHALA_COMMIT"):
        return os.environ["SHALA_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=RESULTS.parent)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str | torch.device = "cpu") -> dict:
    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.device(device).type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, env: dict, rows: list[dict], columns: list[str], out_dir: str | os.PathLike | None = None):
    """Write ``<results>/<device-slug>/<name>.json`` and ``.md``; return the JSON path."""
    base = Path(out_dir) if out_dir else RESULTS / slug(env["device"])
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": name, "environment": env, "rows": rows}, indent=2))
    os.replace(tmp, path)
    header = f"# {name}\n\nDevice: {env['device']} · torch {env['torch']} · triton {env.get('triton')} · commit {env['commit']} · {env['date']}\n\n"
    (base / f"{name}.md").write_text(header + markdown_table(rows, columns) + "\n")
    return path
