"""Atomic, verifiable training checkpoints.

A checkpoint is a directory ``step-00000042/`` holding ``state.pt`` (trainable
weights, optimiser, scheduler, RNG states, step, data position, counters, what
the rollout form keeps, the run's identity), ``adapter/`` (the weights of that
step as a peft adapter folder that ``shala.evaluate --adapter`` and peft load)
and ``manifest.json`` (size and SHA-256 of every file). It is written under a
temporary name, flushed to disk, and renamed into place, so a crash leaves
either a complete checkpoint or a ``.tmp-*`` directory that is never loaded
and is removed by the next save. Loading verifies the manifest
first (it must list ``state.pt``), then unpickles with ``weights_only=True`` and
checks the state's fields: a truncated, altered or foreign file is reported and
nothing is loaded. ``--resume auto`` takes the newest checkpoint that passes,
and says which ones it passed over and why.
"""

from __future__ import annotations

import errno
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
#: What every state a trainer saves holds; a file without them is not one of its checkpoints.
REQUIRED = ("step", "trainable", "optimizer", "scheduler", "sampler", "rng", "config", "run_id")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial, corrupt, or cannot be written."""


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


def step_of(path: Path) -> int:
    return int(_NAME.match(Path(path).name).group(1))


def remove_partial(root: str | os.PathLike) -> list:
    """Remove the ``.tmp-step-*`` directories of interrupted writes (one run writes a directory at a time)."""
    root = Path(root)
    partial = sorted(root.glob(".tmp-step-*")) if root.is_dir() else []
    for tmp in partial:
        shutil.rmtree(tmp, ignore_errors=True)
    if partial:
        log.info("removed %d unfinished checkpoint write(s) in %s: %s", len(partial), root,
                 ", ".join(p.name for p in partial))
    return partial


def _write_error(final: Path, err: BaseException) -> CheckpointError:
    full = isinstance(err, OSError) and err.errno == errno.ENOSPC
    try:
        free = shutil.disk_usage(final.parent).free
    except OSError:
        free = None
    if not full and free is not None and free < (1 << 20):
        full = True  # torch's writer reports a full disk as "file write failed" without the errno
    why = "no space left on device" if full else str(err)
    room = "" if free is None else f" ({free / 2**20:.1f} MiB free on that file system)"
    return CheckpointError(f"cannot write checkpoint {final}: {why}{room}; nothing was saved at this step")


def save(root: str | os.PathLike, step: int, state: dict, *, keep: int = 2, extra=None) -> Path:
    """Write ``root/step-<step>/`` atomically; keep the newest ``keep`` checkpoints up to ``step``.

    ``extra(folder)`` writes further files (the adapter) into the checkpoint before its manifest.

    Checkpoints of later steps are an abandoned continuation (the run was resumed from an
    earlier one) and are removed, so ``--resume auto`` can never pick one up.
    """
    root = Path(root)
    final = root / f"step-{step:08d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_partial(root)
        tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
        tmp.mkdir()
        with open(tmp / STATE, "wb") as f:
            torch.save(state, f)
        _fsync(tmp / STATE)
        if extra is not None:
            extra(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for f in files:
            _fsync(f)
        manifest = {"step": step, "files": {f.relative_to(tmp).as_posix(): {"bytes": f.stat().st_size,
                                                                            "sha256": _sha256(f)} for f in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync(tmp / MANIFEST)
        if final.exists():  # a re-run of the same step replaces its checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(root / f".tmp-step-{step:08d}-{os.getpid()}", ignore_errors=True)
        raise _write_error(final, err) from err
    done = list_checkpoints(root)
    later = [p for p in done if step_of(p) > step]
    for old in later + [p for p in done if step_of(p) <= step][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if later:
        log.info("removed checkpoint(s) %s of an abandoned continuation (this run goes on from step %d)",
                 ", ".join(p.name for p in later), step)
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
        files = {name: (int(info["bytes"]), str(info["sha256"])) for name, info in manifest["files"].items()}
        if STATE not in files:
            raise KeyError(STATE)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is partial: {MANIFEST} is missing") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} is unreadable or does not list "
                              f"{STATE} with its size and SHA-256") from None
    for name, (size, sha) in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is partial: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {f.stat().st_size} bytes, the manifest "
                                  f"says {size}")
        if _sha256(f) != sha:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its SHA-256 in the manifest")
    return manifest


def load(path: str | os.PathLike) -> dict:
    """Verify, then load the state dict of a checkpoint (on CPU, tensors and plain data only)."""
    path = Path(path)
    verify(path)
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling raises many kinds; none may pass for a loaded checkpoint
        raise CheckpointError(f"checkpoint {path} is corrupt: {STATE} cannot be loaded ({err})") from None
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a SHALA training state: {STATE} lacks {missing}")
    return state


def load_latest(root: str | os.PathLike) -> tuple:
    """``(path, state)`` of the newest checkpoint under ``root`` that loads, or ``(None, None)`` when none exist.

    A newer checkpoint that fails is passed over with a warning naming why; when every one
    fails, CheckpointError lists them all.
    """
    found = list_checkpoints(root)
    problems = []
    for path in reversed(found):
        try:
            state = load(path)
        except CheckpointError as err:
            problems.append(str(err))
            log.warning("passing over %s", err)
            continue
        if problems:
            log.warning("resuming from %s, the newest checkpoint that loads", path)
        return path, state
    if problems:
        raise CheckpointError("no checkpoint in {} loads: {}".format(root, "; ".join(problems)))
    return None, None


def find_resume(spec: Optional[str], root: str | os.PathLike) -> tuple:
    """``spec``: None (start fresh), 'auto' (:func:`load_latest`) or a directory.

    Returns ``(path, state)``, or ``(None, None)`` when there is nothing to resume.
    """
    if spec is None:
        return None, None
    if spec == "auto":
        return load_latest(root)
    return Path(spec), load(spec)
