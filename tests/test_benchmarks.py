"""The benchmark harnesses on CPU: bench_train_step --quick end to end, and benchmarks.render.

Timings here are of a tiny random model on a shared CPU: the tests check what the
scripts write, never how fast anything is.
"""

import functools
import importlib.util
import json
import math

import pytest
import torch

from benchmarks import bench_advantage, bench_rewards, bench_train_step, render
from benchmarks._common import environment, write_results
from shala import advantages as A

HAS_TRL = importlib.util.find_spec("trl") is not None
SIDE_FIELDS = ("timed_steps", "step_s", "step_s_min", "step_s_max", "generation_s", "scoring_s", "update_s",
               "rollouts_per_s", "tokens_per_s", "peak_rss_MB", "threads", "per_step")


@pytest.fixture(scope="module")
def train_step_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_step")
    bench_train_step.main(["--quick", "--threads", "1", "--out", str(out)])
    return out / "bench_train_step.json"


def test_train_step_quick_writes_both_sides(train_step_result):
    data = json.loads(train_step_result.read_text())
    env, rows = data["environment"], {r["side"]: r for r in data["rows"]}
    assert data["benchmark"] == "bench_train_step"
    for key in ("device", "commit", "date", "torch", "transformers", "peft", "model", "batch_size", "group_size",
                "completion_length", "timed_steps", "threads"):
        assert key in env, key
    assert (env["batch_size"], env["group_size"], env["completion_length"], env["timed_steps"]) == (2, 4, 1, 2)
    assert "quick" in env["benchmark_mode"] and env["arms"] is None
    assert (train_step_result.with_suffix(".md")).read_text().startswith("# bench_train_step")

    shala = rows["shala"]
    assert shala["status"] == "measured"
    for key in SIDE_FIELDS:
        assert key in shala, key
    assert shala["timed_steps"] == 2 and len(shala["per_step"]) == 3  # warm-up + timed
    assert shala["threads"] == 1
    assert all(s["ok"] for s in shala["per_step"])
    assert shala["step_s"] > 0 and shala["peak_rss_MB"] > 0 and shala["step_time_vs_shala"] == 1.0
    parts = shala["generation_s"] + shala["scoring_s"] + shala["update_s"]
    assert parts <= shala["step_s"] * 1.01  # the trainer's split lies within the step timed around it

    trl = rows["trl"]
    if not HAS_TRL:
        assert trl["status"] == "skipped" and "trl is not installed" in trl["note"]
        return
    assert trl["status"] == "measured", trl.get("note")
    for key in SIDE_FIELDS:
        assert key in trl, key
    assert trl["timed_steps"] == shala["timed_steps"] and trl["threads"] == shala["threads"]
    assert env["same_prompts"] is True and env["trl_prompt_tokens_match"] is True
    assert math.isclose(trl["step_time_vs_shala"], trl["step_s"] / shala["step_s"])
    assert math.isclose(trl["peak_rss_vs_shala"], trl["peak_rss_MB"] / shala["peak_rss_MB"])
    # the same rollouts on both sides: B*G prompts of identical tokens, one answer token each
    assert [s["tokens"] for s in trl["per_step"]] == [s["tokens"] for s in shala["per_step"]]


def test_train_step_times_the_shared_prefix_beside_the_plain_path(tmp_path):
    data = bench_train_step.main(["--quick", "--threads", "1", "--max-new-tokens", "3", "--sides",
                                  "shala,shala-plain", "--out", str(tmp_path)])
    rows = {r["side"]: r for r in data["rows"]}
    assert rows["shala"]["status"] == rows["shala-plain"]["status"] == "measured"
    # the same rollouts either way: sharing the prompt changes how it is encoded, not what is sampled
    assert [s["tokens"] for s in rows["shala"]["per_step"]] == [s["tokens"] for s in rows["shala-plain"]["per_step"]]
    assert math.isclose(rows["shala-plain"]["step_time_vs_shala"], rows["shala-plain"]["step_s"] /
                        rows["shala"]["step_s"])


def test_train_step_times_the_common_prefix_beside_the_plain_path(tmp_path):
    data = bench_train_step.main(["--quick", "--threads", "1", "--few-shot", "1", "--sides", "shala,shala-common",
                                  "--out", str(tmp_path)])
    rows = {r["side"]: r for r in data["rows"]}
    assert rows["shala"]["status"] == rows["shala-common"]["status"] == "measured"
    assert data["environment"]["few_shot"] == rows["shala"]["few_shot"] == rows["shala-common"]["few_shot"] == 1
    # the same prompts, examples included, either way: the head is encoded once, not dropped
    assert [s["tokens"] for s in rows["shala"]["per_step"]] == [s["tokens"] for s in rows["shala-common"]["per_step"]]
    assert math.isclose(rows["shala-common"]["step_time_vs_shala"], rows["shala-common"]["step_s"] /
                        rows["shala"]["step_s"])
    with pytest.raises(SystemExit, match="--few-shot 2: a number >= 0, for shala's sides only"):
        bench_train_step.parse_args(["--quick", "--few-shot", "2"])


def test_train_step_times_an_arm_with_its_own_options(tmp_path):
    data = bench_train_step.main(["--quick", "--threads", "1", "--sides", "shala", "--arm",
                                  "fs1-frozen=--few-shot 1 --frozen-head", "--out", str(tmp_path)])
    rows = {r["side"]: r for r in data["rows"]}
    assert list(rows) == ["shala", "fs1-frozen"]
    assert rows["fs1-frozen"]["status"] == "measured" and rows["fs1-frozen"]["timed_steps"] == 2
    assert (rows["shala"]["few_shot"], rows["fs1-frozen"]["few_shot"]) == (0, 1)
    assert data["environment"]["arms"] == {"fs1-frozen": "--few-shot 1 --frozen-head"}
    assert rows["fs1-frozen"]["note"] == "--few-shot 1 --frozen-head"
    # the example's turn adds the same tokens to every rollout's prompt
    assert all(a["tokens"] > s["tokens"] for a, s in zip(rows["fs1-frozen"]["per_step"], rows["shala"]["per_step"]))
    for r in rows.values():
        timed = sorted(s["step_s"] for s in r["per_step"][1:])
        assert r["step_s_median"] == (timed[0] + timed[1]) / 2
    assert math.isclose(rows["fs1-frozen"]["step_time_vs_shala"], rows["fs1-frozen"]["step_s"] /
                        rows["shala"]["step_s"])


@pytest.mark.parametrize("arm, message", [
    ("shala-common=--few-shot 1", "'shala-common' is a reserved name"),
    ("a=--steps 3", "--arm a: --steps is set by the benchmark"),
    ("a=--group-size=2", "--arm a: --group-size is set by the benchmark"),
    ("a=--seed 1", "--arm a: --seed is set by the benchmark"),
    ("a=--batch 3", "--arm a: --batch-size is set by the benchmark .--batch abbreviates it"),
    ("no options", "expected NAME=OPTIONS"),
])
def test_train_step_arm_errors(arm, message):
    with pytest.raises(SystemExit, match=message):
        bench_train_step.parse_args(["--quick", "--arm", arm])


def test_train_step_arm_named_twice():
    with pytest.raises(SystemExit, match="names an arm twice"):
        bench_train_step.parse_args(["--quick", "--arm", "a=--lr 1e-3", "--arm", "a=--lr 2e-3"])


@pytest.mark.parametrize("options, message", [
    ("--shot-seed 1", "shala.train refuses '--shot-seed 1' .*--shot-seed 1 draws"),
    ("--frozen-hed", "shala.train refuses '--frozen-hed' .*unrecognized arguments: --frozen-hed"),
    ("--config {tmp}/rationale.yaml", "'--config .*rationale.yaml' changes form, which the benchmark sets"),
    ("--method sft-soft", "--method sft-soft trains without rollouts"),
])
def test_train_step_checks_an_arm_before_any_side_runs(monkeypatch, tmp_path, options, message):
    ran = []
    monkeypatch.setattr(bench_train_step, "run_side", lambda *a: ran.append(a))
    (tmp_path / "rationale.yaml").write_text("form: rationale\n")
    with pytest.raises(SystemExit, match=f"--arm bad: {message}"):
        bench_train_step.main(["--quick", "--threads", "1", "--sides", "shala", "--arm",
                               f"bad={options.format(tmp=tmp_path)}",
                               "--out", str(tmp_path)])
    assert ran == []


def test_train_step_child_gets_the_arms_as_given(tmp_path):
    args = bench_train_step.parse_args(["--quick", "--few-shot", "1", "--sides", "shala", "--arm",
                                        "ins=--instruction '{premise} -- \"{hypothesis}\"? {options}'"])
    child = bench_train_step.parse_args(bench_train_step.child_argv(args, "ins", tmp_path / "r.json", "m"))
    assert child.side == "ins" and child.arms == args.arms
    assert child.arms["ins"] == ["--instruction", '{premise} -- "{hypothesis}"? {options}']
    with pytest.raises(SystemExit, match="--side other: not a side or an --arm of this run"):
        bench_train_step.parse_args(bench_train_step.child_argv(args, "other", tmp_path / "r.json", "m"))


def test_train_step_summary_reports_the_median_beside_the_mean():
    steps = [{"step_s": t, "generation_s": 0.0, "scoring_s": 0.0, "update_s": 0.0, "tokens": 10}
             for t in (50.0, 1.0, 2.0, 10.0)]  # the first is the untimed warm-up
    out = bench_train_step._summary(steps, torch.device("cpu"), False, 8)
    assert out["timed_steps"] == 3 and out["step_s_median"] == 2.0 and math.isclose(out["step_s"], 13 / 3)
    assert (out["step_s_min"], out["step_s_max"]) == (1.0, 10.0)


def test_train_step_skips_trl_when_missing(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    row = bench_train_step.run_side(bench_train_step.parse_args(["--quick"]), "trl", "unused", tmp_path)
    assert row == {"side": "trl", "status": "skipped", "note": "skipped: trl is not installed (pip install trl)"}


def _rewards_rows(monkeypatch):
    """Real bench_rewards rows (its bench_shape) for a few tiny shapes, eager reference only, one timing round."""
    monkeypatch.setattr(bench_rewards, "time_cpu_interleaved",
                        functools.partial(bench_rewards.time_cpu_interleaved, min_seconds=0.0))
    device = torch.device("cpu")
    ref = bench_rewards.reference_fns(compiled=False)
    rows = []
    for n, v, normalize in [(n, v, m) for n in (8, 32) for v in (50, 200) for m in bench_rewards.MODES]:
        fns = {(op, "reference"): bench_rewards.make_fn(op, normalize, "reference", ref) for op in bench_rewards.OPS}
        rows += bench_rewards.bench_shape(n, v, 3, torch.float32, normalize, device, ("reference",), fns, None,
                                          2**20, 2**30)
    return rows


@pytest.fixture
def results_dir(tmp_path, monkeypatch, train_step_result):
    """A results folder as the benchmarks write it: a CPU device with all three benchmarks, and a
    second device whose bench_rewards rows are marked as a format test (fused rows copied from the
    reference ones, so that the fused branch of the plot is drawn)."""
    cpu = tmp_path / "results" / "cpu-device"
    cpu.mkdir(parents=True)
    (cpu / "bench_train_step.json").write_text(train_step_result.read_text())
    if A.backend("cpu") == "extension":
        bench_advantage.main(["--quick", "--device", "cpu", "--threads", "1", "--out-dir", str(cpu)])
    rows = _rewards_rows(monkeypatch)
    env = dict(environment("cpu"), fused="unmeasured on CPU", grid="format test (tiny shapes)")
    write_results("bench_rewards", env, [dict(op="all", impl="fused", note=env["fused"])] + rows,
                  bench_rewards.COLUMNS, out_dir=cpu)
    fake = [dict(r, impl="fused", median_ms=r["median_ms"] / 4) for r in rows if r.get("median_ms")]
    env_gpu = dict(env, device="format-test GPU (synthetic rows, not a measurement)")
    write_results("bench_rewards", env_gpu, rows + fake, bench_rewards.COLUMNS, out_dir=tmp_path / "results" / "gpu")
    return tmp_path / "results"


def test_render_writes_results_and_plot(results_dir, tmp_path):
    md, png = tmp_path / "RESULTS.md", results_dir / "plot.png"
    render.main(["--results", str(results_dir), "--out", str(md)])
    text = md.read_text()
    sections = [line.split(" · ")[0] for line in text.splitlines() if line.startswith("## ")]
    expected = ["## bench_rewards", "## bench_rewards", "## bench_train_step"]
    if A.backend("cpu") == "extension":
        expected.insert(0, "## bench_advantage")
    assert sections == expected
    # every table is preceded by its device, commit and date
    for block in text.split("\n## ")[1:]:
        assert "device: " in block and "commit: " in block and "date: " in block, block[:200]
        assert "\n| " in block
    assert "| shala | measured |" in text
    assert "![" in text and "results/plot.png" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "fused vs reference" in text  # the synthetic device has fused rows


def test_plot_title_says_when_fused_is_unmeasured(results_dir, tmp_path):
    (results_dir / "gpu" / "bench_rewards.json").unlink()
    md = render.render(results_dir, tmp_path / "R.md", tmp_path / "p.png")
    assert "fused Triton path is unmeasured" in md.read_text()
    assert render.plot_title(False).endswith("(CPU-only results: the fused Triton path is unmeasured)")
    assert (tmp_path / "p.png").stat().st_size > 5000


def test_plot_shows_bf16_where_fused_was_timed():
    def row(impl, dtype, ms=1.0):
        return dict(op="reward", impl=impl, dtype=dtype, median_ms=ms)

    reference_only = [row("reference", "fp32"), row("reference", "bf16"), row("fused", "bf16", None)]
    assert render.plot_dtype(reference_only) == "fp32"
    assert render.plot_dtype(reference_only + [row("fused", "fp32"), row("fused", "bf16")]) == "bf16"
    assert render.plot_dtype([row("reference", "fp32"), row("fused", "fp32")]) == "fp32"  # no bf16 timed
    assert render.plot_dtype([row("reference", "bf16")]) == "bf16"  # no fp32 timed


def test_render_without_results(tmp_path):
    md = render.render(tmp_path / "none", tmp_path / "R.md", tmp_path / "p.png")
    assert "No results yet." in md.read_text() and not (tmp_path / "p.png").exists()


def test_launch_sweep_runs_the_kernel_with_the_given_configuration(monkeypatch):
    """The fused path under the interpreter, with a patched launch configuration, against float64."""
    import shala
    from shala import reference as R
    from shala.kernels import label_jsd as LJ

    monkeypatch.setenv("SHALA_BACKEND", "triton")

    default = LJ.launch_config
    seen = []
    logits = torch.randn(3, 100)
    ids, target = torch.tensor([4, 50, 97]), torch.softmax(torch.randn(3, 3), -1)
    expect = R.label_reward(logits.double(), ids, target.double(), normalize="vocab")

    def call(s):
        seen.append(LJ.launch_config(100, 3))
        return shala.label_reward(s, ids, target, normalize="vocab")

    got = bench_rewards.with_launch(call, 32, 2)(logits)
    assert seen == [LJ.LaunchConfig(block_k=4, block_v=32, num_warps=2)] and LJ.launch_config is default
    torch.testing.assert_close(got.js_div.double(), expect.js_div, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.label_mass.double(), expect.label_mass, rtol=1e-5, atol=1e-7)
    assert bench_rewards.with_launch(call, 4096, 8)(logits) is not None
    assert seen[-1].block_v == 128  # at most the row's width, as the default


@pytest.mark.parametrize("text, message", [("4096", "expected BLOCK_VxWARPS"), ("1000x8", "power of two"),
                                           ("4096x3", "WARPS one of")])
def test_launch_option_errors(text, message):
    with pytest.raises(Exception, match=message):
        bench_rewards.parse_launch(text)


def test_side_killed_by_the_kernel_says_so(tmp_path, monkeypatch):
    """A side killed by SIGKILL (the OOM killer) is reported as such, not by its last stderr line."""
    import subprocess

    killed = subprocess.CompletedProcess(args=[], returncode=-9, stdout="", stderr="  warnings.warn(\n")
    monkeypatch.setattr(bench_train_step, "_child", lambda *a, **k: killed)
    args = bench_train_step.parse_args(["--quick"])
    row = bench_train_step.run_side(args, "shala", "tiny", tmp_path)
    assert row["status"] == "failed"
    assert "SIGKILL" in row["note"] and "out of memory" in row["note"] and "warnings.warn" not in row["note"]
