"""Atomic, verifiable training checkpoints.

A checkpoint is a directory ``step-00000042/`` holding ``state.pt`` (trainable
weights, optimiser, scheduler, RNG states, step, data position, counters) and
``manifest.json`` (size and SHA-256 of every file). It is written under a
temporary name, flushed to disk, and renamed into place, so a crash leaves
either a complete checkpoint or a ``.tmp-*`` directory that is never loaded.
Loading verifies the manifest first: a truncated or altered file is reported
and nothing is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

STATE = "state.pt"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: str | os.PathLike, step: int, state: dict, *, keep: int = 2) -> Path:
    """Write ``root/step-<step>/`` atomically and keep only the newest ``keep`` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(state, tmp / STATE)
    _fsync(tmp / STATE)
    manifest = {"step": step, "files": {STATE: {"bytes": (tmp / STATE).stat().st_size, "sha256": _sha256(tmp / STATE)}}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync(tmp / MANIFEST)
    if final.exists():  # a re-run of the same step replaces its checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list:
    """Finished checkpoint directories under ``root``, oldest first (temporary ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def verify(path: str | os.PathLike) -> dict:
    """Check a checkpoint against its manifest; return the manifest or raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is partial: {MANIFEST} is missing") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} is unreadable") from None
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is partial: {name} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {size} bytes, the manifest says {info['bytes']}")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its SHA-256 in the manifest")
    return manifest


def load(path: str | os.PathLike) -> dict:
    """Verify, then load the state dict of a checkpoint (on CPU)."""
    path = Path(path)
    verify(path)
    return torch.load(path / STATE, map_location="cpu", weights_only=True)


def find_resume(spec: Optional[str], root: str | os.PathLike) -> Optional[Path]:
    """``spec``: None (start fresh), 'auto' (newest checkpoint under ``root``, if any) or a directory."""
    if spec is None:
        return None
    if spec != "auto":
        return Path(spec)
    found = list_checkpoints(root)
    partial = [p.name for p in Path(root).glob(".tmp-step-*")] if Path(root).is_dir() else []
    if partial:
        log.warning("ignoring unfinished checkpoint(s) %s in %s", partial, root)
    return found[-1] if found else None
