"""scripts/device_check.sh's schedule, dry-run on the CPU (tiny workloads, Triton interpreter): every stage runs in
priority order and writes what it should; a short deadline cuts or skips stages but the run still ends on time
with its summary. No timing assertions on the workloads themselves."""
import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.join(os.path.dirname(__file__), "..")
ORDER = ["build", "precompile", "op-tests", "gpu-tests", "throughput", "time-to-accuracy"]
LIMITS_MAX_S = 420  # what the stages' own limits may add up to (the first-run issue's budget)


def dry_run(out, mnist_root, deadline):
    env = dict(os.environ, DEVICE_CHECK_DRY_RUN="1", DEVICE_CHECK_DEADLINE_S=str(deadline), PYTHON=sys.executable,
               RESNET_FUSED_DATA=mnist_root, TRITON_CACHE_DIR=str(out.parent / "triton-cache"))
    t0 = time.monotonic()
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh"), str(out)], env=env, timeout=deadline + 60,
                   check=True, capture_output=True, text=True)
    return time.monotonic() - t0, json.loads((out / "summary.json").read_text())


def test_dry_run_runs_every_stage_and_writes_at_most_8_files(tmp_path, mnist_root):
    out = tmp_path / "out"
    elapsed, summary = dry_run(out, mnist_root, deadline=400)
    assert [s["stage"] for s in summary["stages"]] == ORDER
    assert all(s["rc"] == 0 and s["status"] == "done" for s in summary["stages"]), summary
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and all(os.path.isfile(out / f) for f in files)
    assert set(files) == {"device_check.log", "summary.json", "precompile.json", "junit-ops.xml", "junit.xml",
                          "throughput.json", "throughput-tv.json", "time_to_accuracy.json"}
    assert "<testcase" in (out / "junit.xml").read_text() and "<testcase" in (out / "junit-ops.xml").read_text()
    tp = json.loads((out / "throughput.json").read_text())
    assert tp["complete"] and any(r["status"] == "ok" for r in tp["rows"])
    tv = json.loads((out / "throughput-tv.json").read_text())
    assert tv["complete"] and {r["model"] for r in tv["rows"] if r["status"] == "ok"} == {"tv-resnet18"}
    assert summary["version"] == 3
    assert sum(s["wanted_s"] for s in summary["stages"]) == summary["limits_sum_s"] <= LIMITS_MAX_S
    assert all(s["limit_s"] <= s["wanted_s"] for s in summary["stages"])
    assert summary["total_s"] <= summary["deadline_s"] and elapsed < summary["deadline_s"] + 30


def test_a_short_deadline_cuts_stages_but_the_summary_comes_on_time(tmp_path, mnist_root):
    out = tmp_path / "out"
    elapsed, summary = dry_run(out, mnist_root, deadline=30)
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ORDER  # every stage is accounted for, run or not
    assert any(s["status"] in ("skipped: deadline", "cut at its limit") for s in stages.values())
    assert stages["time-to-accuracy"]["status"] == "skipped: deadline"
    assert elapsed < 30 + 15  # the deadline, the last stage's 5 s kill grace and bash's own start


def test_stage_limits_that_add_up_to_more_than_the_budget_are_refused(tmp_path):
    env = dict(os.environ, DEVICE_CHECK_DRY_RUN="1", PYTHON=sys.executable, TESTS_LIMIT="400")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh"), str(tmp_path / "out")], env=env,
                       timeout=60, capture_output=True, text=True)
    assert r.returncode == 2 and "add up to" in r.stdout and "420" in r.stdout
    assert not (tmp_path / "out" / "summary.json").exists()
