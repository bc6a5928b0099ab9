"""benchmarks/gpu_suite.sh's CPU dry run (GPU_SUITE_DRY_RUN=1): every stage's plumbing, so the script that
gets one short GPU window cannot rot between windows. The full dry run takes about 1.5 minutes on 2 cores."""
import glob
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from helpers import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
STAGES = ("build", "gpu-tests", "bench", "e2e", "parallel", "compile", "sanitizer", "report")


def _env(results):
    env = dict(os.environ, GPU_SUITE_DRY_RUN="1", RESULTS_DIR=str(results), PYTHON=sys.executable)
    env.pop("PYTEST_ADDOPTS", None)
    return env


def _one(results, pattern):
    found = glob.glob(os.path.join(str(results), pattern))
    assert len(found) == 1, f"expected one {pattern} under {results}, found {found}"
    return found[0]


def _stage_verdict(results, stage):
    with open(_one(results, f"*-{stage}.txt")) as f:
        return f.read().rstrip().splitlines()[-1]


def test_dry_run_leaves_one_result_file_per_stage(tmp_path):
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for stage in STAGES:
        assert _stage_verdict(tmp_path, stage).startswith(f"== stage {stage}: ok"), stage
    with open(_one(tmp_path, "*-summary.txt")) as f:
        summary = f.read()
    assert all(f"{stage}: ok" in summary for stage in STAGES), summary
    # What each stage exists to produce.
    assert json.load(open(_one(tmp_path, "*-env.json")))["torch"]
    assert 'tests="' in open(_one(tmp_path, "*-gpu-tests.xml")).read()
    for name in ("haar", "causal_conv", "ista"):
        assert json.load(open(_one(tmp_path, f"*-bench-{name}.json")))["benchmarks"], name
    e2e = json.load(open(_one(tmp_path, "*-e2e-5x16x16-bfloat16.json")))
    assert {"reference", "fused"} <= set(e2e["results"]) and "error_vs_float32" in e2e["results"]["fused"]
    assert json.load(open(_one(tmp_path, "*-compile-ops.json")))["benchmarks"]
    par = json.load(open(_one(tmp_path, "*-parallel-2ranks.json")))  # 2 gloo ranks on the CPU
    assert par["agreement"]["max_rel"] <= 1e-5
    report = open(_one(tmp_path, "*-report.md")).read()
    # The GPU figures this CPU run cannot produce are marked, not left out; the tiny clip's are there.
    assert "| 17x1080x1920 | bfloat16 | not measured |" in report
    assert "| 5x16x16 | bfloat16 | " in report and "| haar | test_patch[forward-f32] | " in report


def test_killed_after_build_keeps_the_build_results(tmp_path):
    results, archive = tmp_path / "results", tmp_path / "suite.tgz"
    env = dict(_env(results), GPU_SUITE_ARCHIVE=str(archive))
    proc = subprocess.Popen(["bash", SCRIPT], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        summary = None
        while time.monotonic() < deadline:
            found = glob.glob(os.path.join(str(results), "*-summary.txt"))
            if found and "build:" in open(found[0]).read():
                summary = found[0]
                break
            assert proc.poll() is None, "the suite ended before its build stage did"
            time.sleep(0.2)
        assert summary, "the build stage did not finish within 120 s"
        proc.send_signal(signal.SIGTERM)  # to the script alone: it must stop the running stage itself
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, out[-3000:]
    assert _stage_verdict(results, "build").startswith("== stage build: ok")
    assert json.load(open(_one(results, "*-env.json")))["commit"]
    text = open(summary).read()
    assert "INTERRUPTED" in text and "bench:" not in text, text
    # The stage that was running is gone too (its pytest would otherwise write on); a dying Python
    # takes a moment to exit, so poll.
    left = b"?"
    for _ in range(75):
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).stdout
        if not left:
            break
        time.sleep(0.2)
    assert left == b"", f"processes of the killed suite still running: {left!r}"
    # The archive a GPU window brings back holds the finished stage's files.
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert any(n.endswith("-build.txt") for n in names) and any(n.endswith("-env.json") for n in names), names


def test_budget_skips_what_does_not_fit(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "--budget", "12", "gpu-tests", "report"], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped gpu-tests" in proc.stdout
    with open(_one(tmp_path, "*-gpu-tests.txt")) as f:
        assert f.read().startswith("SKIPPED: gpu-tests needs at least 30 s")
    report = open(_one(tmp_path, "*-report.md")).read()
    assert "GPU correctness (`pytest -m gpu`): not measured" in report
    assert "| causal_conv | (all) | not measured |" in report


@pytest.mark.parametrize("args, message", [
    (["--budget", "ten"], "--budget expects whole seconds"),
    (["benchmark"], "unknown stage 'benchmark'"),
])
def test_bad_arguments_are_refused(tmp_path, args, message):
    proc = subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def _bench(name, provider, median, **info):
    return {"name": f"{name}[forward-bf16-{provider}]", "stats": {"median": median},
            "extra_info": dict(provider=provider, **info)}


def test_report_of_a_partial_gpu_run(tmp_path):
    """A GPU run cut short after the bench stage: its figures in the README table, the rest 'not measured',
    and the device, versions and commit of the run (its env file), not of the machine making the report."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    prefix = str(tmp_path / "2026-01-01T0000-NVIDIA-H200")
    env = {"python": "3.12.3", "torch": "2.11.0+cu130", "triton": "3.6.0", "device": "NVIDIA H200", "commit": "abc1234"}
    json.dump(env, open(prefix + "-env.json", "w"))
    json.dump({"benchmarks": [
        _bench("test_patch", "reference", 4e-3),
        _bench("test_patch", "cuda", 1e-3, gbps=3000.0, copy_gbps=4300.0, frac_copy_bw=0.698),
    ]}, open(prefix + "-bench-haar.json", "w"))
    open(prefix + "-summary.txt", "w").write("build: ok in 70 s\nbench: ok in 90 s\n")
    assert report.run_report(prefix) == 0
    text = open(prefix + "-report.md").read()
    assert "- device: NVIDIA H200" in text and "- commit: abc1234" in text
    assert "| haar | test_patch[forward-bf16] | 4.000 | 1.000 (4.00x, 70%) | not measured |" in text
    assert "| causal_conv | (all) | not measured |" in text and "| ista | (all) | not measured |" in text
    assert "| 17x1080x1920 | bfloat16 | not measured |" in text
    assert "GPU correctness (`pytest -m gpu`): not measured" in text
    assert "copy bandwidth measured in the same run: 4300.0 GB/s" in text
