"""A run never destroys or silently continues another, and a damaged checkpoint is never trusted.

Each case is one a careless or hostile user can make, on a tiny model.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shala import checkpoint as ckpt
from shala import train
from shala.outputs import OutputDirError
from tests.test_train import FAST, ROOT
from tests.tiny import save_tiny

QUIET = ["--no-eval-before", "--no-eval-after", "--lr", "5e-3"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def run(tiny_dir, out, *extra):
    return train.main(["--model", tiny_dir, "--output-dir", str(out), *FAST, *extra])


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` and its bytes (the lock file aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_another_run_in_the_same_directory_is_refused_and_nothing_changes(tiny_dir, tmp_path):
    out = tmp_path / "run"
    run(tiny_dir, out, "--steps", "4", "--save-every", "2", *QUIET)
    before = snapshot(out)
    assert {"config.json", "metrics.jsonl", "final/adapter_model.safetensors"} <= set(before)
    # a different run, or the same options again, without --resume: refused before anything is written
    for extra in (["--save-every", "1", "--lr", "1e-3"], ["--save-every", "2", *QUIET]):
        with pytest.raises(OutputDirError, match=r"holds another run \(config\.json, metrics\.jsonl, checkpoints, "
                                                 r"final.*--resume auto.*--overwrite"):
            run(tiny_dir, out, "--steps", "4", "--no-eval-before", *extra)
    assert snapshot(out) == before
    # --overwrite moves the old run aside, whole, and the new run's checkpoints are its own
    run(tiny_dir, out, "--steps", "3", "--save-every", "1", "--no-eval-before", "--no-eval-after", "--lr", "1e-3",
        "--overwrite")
    (aside,) = tmp_path.glob("run.replaced-*")
    assert snapshot(aside) == before
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000003"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_new_run_interrupted_in_an_old_runs_directory_resumes_from_its_own_checkpoint(tiny_dir, tmp_path):
    """An old 10-step run, then another run there (--overwrite) stopped after step 3, then --resume auto."""
    out = tmp_path / "run"
    run(tiny_dir, out, "--steps", "10", "--save-every", "5", *QUIET)
    new = ["--steps", "5", "--save-every", "2", "--no-eval-before", "--no-eval-after", "--lr", "1e-3"]
    cfg = train.load_config(["--model", tiny_dir, "--output-dir", str(out), *FAST, *new, "--overwrite"])
    assert train.Trainer(cfg).fit(stop_after=3) == {"stopped": True, "step": 3}  # as a SIGTERM after step 3 leaves it
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000003"]
    resumed = run(tiny_dir, out, *new, "--resume", "auto")
    straight = run(tiny_dir, tmp_path / "straight", *new)
    assert resumed["steps"] == 5 and resumed["adapter_checksums"] == straight["adapter_checksums"]
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    (aside,) = tmp_path.glob("run.replaced-*")  # the old run, whole
    assert [p.name for p in ckpt.list_checkpoints(aside / "checkpoints")] == ["step-00000005", "step-00000010"]


@pytest.mark.parametrize("option, value, shown", [("--lr", "1e-3", "--lr 0.005 (now 0.001)"),
                                                   ("--lora-alpha", "8", "--lora-alpha 32 (now 8)"),
                                                   ("--dtype", "bfloat16", "--dtype 'float32' (now 'bfloat16')"),
                                                   ("--temperature", "0.7", "--temperature 1.0 (now 0.7)"),
                                                   ("--group-size", "2", "--group-size 4 (now 2)")])
def test_a_resume_that_changes_the_run_is_refused_before_anything_is_written(tiny_dir, tmp_path, option, value,
                                                                             shown):
    run(tiny_dir, tmp_path, "--steps", "2", "--save-every", "1", *QUIET)
    before = snapshot(tmp_path)
    with pytest.raises(OutputDirError, match="options differ from that run's: " + shown.replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        run(tiny_dir, tmp_path, "--steps", "2", "--save-every", "1", *QUIET, "--resume", "auto", option, value)
    assert snapshot(tmp_path) == before  # config.json too


def test_a_checkpoint_of_another_run_is_refused(tiny_dir, tmp_path):
    run(tiny_dir, tmp_path / "a", "--steps", "2", "--save-every", "1", *QUIET)
    other = ckpt.list_checkpoints(tmp_path / "a" / "checkpoints")[0]
    with pytest.raises(ckpt.CheckpointError, match=r"belongs to another run \(options differ: --lr 0\.005 "
                                                   r"\(now 0\.001\)"):
        run(tiny_dir, tmp_path / "b", "--steps", "2", "--no-eval-before", "--lr", "1e-3", "--resume", str(other))
    assert not (tmp_path / "b" / "config.json").exists()


def test_resume_passes_over_damaged_checkpoints_and_says_which_it_took(tiny_dir, tmp_path, caplog):
    args = ["--steps", "3", "--save-every", "1", "--keep-checkpoints", "3", *QUIET]
    straight = run(tiny_dir, tmp_path / "straight", *args)
    run(tiny_dir, tmp_path / "hurt", *args)
    first, second, third = ckpt.list_checkpoints(tmp_path / "hurt" / "checkpoints")
    data = (third / ckpt.STATE).read_bytes()
    (third / ckpt.STATE).write_bytes(data[: len(data) // 2])  # truncated
    (second / ckpt.MANIFEST).write_text('{"step": 2, "files": {}}')  # a manifest that lists nothing
    (tmp_path / "hurt" / "final").rename(tmp_path / "final-kept")
    with caplog.at_level(logging.WARNING):
        resumed = run(tiny_dir, tmp_path / "hurt", *args, "--resume", "auto")
    assert f"passing over checkpoint {third} is corrupt: state.pt has" in caplog.text
    assert f"checkpoint {second} is corrupt: manifest.json is unreadable or does not list state.pt" in caplog.text
    assert f"resuming from {first}, the newest checkpoint that loads" in caplog.text
    assert resumed["adapter_checksums"] == straight["adapter_checksums"]  # steps 2 and 3 retrained exactly
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* loads"):
        for path in ckpt.list_checkpoints(tmp_path / "hurt" / "checkpoints"):
            (path / ckpt.STATE).write_bytes(b"")
        ckpt.load_latest(tmp_path / "hurt" / "checkpoints")


def test_checkpoint_files_that_verify_but_are_not_a_training_state(tmp_path):
    path = ckpt.save(tmp_path, 1, {"step": 1}, keep=2)
    with pytest.raises(ckpt.CheckpointError, match=r"not a SHALA training state: state\.pt lacks \['trainable'"):
        ckpt.load(path)
    zeros = b"\0" * 4096  # zeroed bytes with a manifest made to match them
    (path / ckpt.STATE).write_bytes(zeros)
    import hashlib

    (path / ckpt.MANIFEST).write_text(json.dumps({"step": 1, "files": {ckpt.STATE: {
        "bytes": len(zeros), "sha256": hashlib.sha256(zeros).hexdigest()}}}))
    with pytest.raises(ckpt.CheckpointError, match=r"is corrupt: state\.pt cannot be loaded"):
        ckpt.load(path)
    (path / ckpt.MANIFEST).write_text("[]")
    with pytest.raises(ckpt.CheckpointError, match="manifest.json is unreadable"):
        ckpt.load(path)
    (path / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"is partial: manifest\.json is missing"):
        ckpt.load(path)


def test_saving_removes_interrupted_writes_and_checkpoints_of_an_abandoned_continuation(tmp_path):
    for step in (2, 4, 6):
        ckpt.save(tmp_path, step, {"step": step}, keep=3)
    (tmp_path / ".tmp-step-00000007-12345").mkdir()  # a write killed by kill -9
    (tmp_path / ".tmp-step-00000007-12345" / "state.pt").write_bytes(b"half")
    ckpt.save(tmp_path, 3, {"step": 3}, keep=3)  # resumed from step 2: steps 4 and 6 are another future
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert not list(tmp_path.glob(".tmp-step-*"))


def test_a_full_disk_gives_a_clean_error_and_keeps_the_older_checkpoints(tmp_path, monkeypatch):
    ckpt.save(tmp_path, 1, {"step": 1}, keep=2)

    def full(obj, f):
        f.write(b"x" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file: "
                           "file write failed")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: type("U", (), {"free": 1024})())
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write checkpoint .*step-00000002: no space left on "
                                                   r"device \(0\.0 MiB free"):
        ckpt.save(tmp_path, 2, {"step": 2}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]
    assert not list(tmp_path.glob(".tmp-step-*"))

    def enospc(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(ckpt.CheckpointError, match="no space left on device"):
        ckpt.save(tmp_path, 2, {"step": 2}, keep=2)


def test_two_processes_cannot_write_one_directory(tiny_dir, tmp_path):
    from shala.config import load_config
    from shala.outputs import RunDir

    cfg = load_config(["--model", tiny_dir, "--output-dir", str(tmp_path), *FAST])
    first = RunDir(tmp_path)
    first.claim(cfg)
    first.lock()
    # the lock is per open file: a second open of it in this process stands for another process
    with pytest.raises(OutputDirError, match=f"is in use by process {os.getpid()}"):
        RunDir(tmp_path).lock()
    first.release()
    RunDir(tmp_path).lock()


def test_an_unwritable_output_dir_is_refused_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train.Policy, "__init__", lambda *a, **k: calls.append("model loaded"))
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OutputDirError, match="is a file, not a directory"):
        run(tiny_dir, tmp_path / "file", "--steps", "1", *QUIET)
    # below a file, and on a read-only file system (which refuses root too)
    for path in (tmp_path / "file" / "run", Path("/proc/self/shala-run")):
        with pytest.raises(OutputDirError, match=f"--output-dir {path} cannot be written"):
            run(tiny_dir, path, "--steps", "1", *QUIET)
    assert calls == []


def test_an_interrupted_run_exits_non_zero_after_its_checkpoint(tiny_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "shala.train", "--model", tiny_dir, "--output-dir", str(tmp_path), *FAST,
           "--steps", "500", "--save-every", "0", *QUIET]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "interrupted: checkpoint written at step" in out
    (path,) = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert ckpt.load(path)["step"] == ckpt.step_of(path) >= 2


def test_training_prompts_longer_than_the_context_stop_the_run_or_are_cut_and_counted(tiny_dir, tmp_path,
                                                                                      monkeypatch):

    rows = [{"uid": f"u{i}", "label_counter": {"e": 3, "n": 1, "c": i % 3},
             "example": {"premise": "A man walks." + (" and walks" * 3000 if i == 5 else ""),
                         "hypothesis": "A person walks."}} for i in range(40)]
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    calls = []
    real = train.Policy.__init__
    monkeypatch.setattr(train.Policy, "__init__", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    args = ["--dataset", f"chaosnli:{data}", "--steps", "1", *QUIET]
    with pytest.raises(ValueError, match=r"(train|held-out) prompts: 1 prompt\(s\) longer than 511 tokens.*u5 "
                                         r"\(\d+ tokens\).*--truncate-prompts"):
        run(tiny_dir, tmp_path / "a", *args)
    assert calls == []  # refused before the model was loaded
    summary = run(tiny_dir, tmp_path / "b", *args, "--truncate-prompts")
    assert sum(summary["truncated_prompts"].values()) == 1
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["truncated_prompts"] == summary[
        "truncated_prompts"]
