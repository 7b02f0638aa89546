"""The benchmark code paths in a tiny CPU configuration; their JSON is validated. No timing assertions."""
import json
import os
import re
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def test_throughput_tiny_cpu(tmp_path):
    import throughput
    out = tmp_path / "tp.json"
    throughput.main(["--device", "cpu", "--models", "resnet8", "--batch-sizes", "4", "--modes", "train,inference",
                     "--impls", "eager,fused-cpu,fused-triton,fused-cuda,compile-reduce-overhead,eager-graph",
                     "--iters", "1", "--repeats", "2", "--json", str(out), "--png", str(tmp_path / "tp.png"), "--no-progress"])
    d = json.loads(out.read_text())
    assert d["complete"] is True
    env = d["environment"]
    for k in ("device_name", "torch", "triton", "cuda", "git_commit", "date"):
        assert k in env
    assert d["peaks"]["fp32"] > 0 and d["peaks"]["bandwidth"] > 0
    rows = {(r["impl"], r["mode"]): r for r in d["rows"]}
    assert len(rows) == 12
    for mode in ("train", "inference"):
        for impl in ("eager", "fused-cpu"):
            r = rows[(impl, mode)]
            assert r["status"] == "ok", r
            assert r["images_per_s"] > 0 and r["step_ms_p20"] <= r["step_ms"] <= r["step_ms_p80"]
            assert r["gflop_per_step"] > 0 and 0 < r["fraction_of_roofline"]
        assert rows[("eager", mode)]["speedup_vs_eager"] == pytest.approx(1.0)
        assert rows[("fused-cpu", mode)]["best_baseline"] == "eager"  # fused rows are never a baseline
        assert rows[("fused-cpu", mode)]["speedup_vs_best_baseline"] == pytest.approx(
            rows[("fused-cpu", mode)]["images_per_s"] / rows[("eager", mode)]["images_per_s"])
        for impl in ("fused-triton", "fused-cuda", "compile-reduce-overhead", "eager-graph"):
            assert rows[(impl, mode)]["status"] == "skipped" and rows[(impl, mode)]["reason"]
    # the roofline's peaks are the best rates seen in the run: no row can pass 100%
    assert all(r["fraction_of_roofline"] <= 1.0 + 1e-9 for r in d["rows"] if r["status"] == "ok")
    # the measured multiply-add peak (CPU): every ok row's share of it from its direct-convolution FLOP count
    fma = d["fma_peaks"]
    assert fma["fp32"] > 0 and fma["fp32_1t"] > 0 and fma["isa"] in ("avx2", "avx512", "avx512_bf16")
    for r in (r for r in d["rows"] if r["status"] == "ok"):
        assert r["achieved_gflops"] == pytest.approx(r["gflop_per_step"] / (r["step_ms"] / 1e3))
        assert r["fraction_of_fma_peak"] == pytest.approx(r["achieved_gflops"] * 1e9 / fma["fp32"])
    assert d["settings"]["isolate"] is True and len(d["best_baselines"]) == 2
    assert d["settings"]["quiet_start"] is os.path.exists("/proc/stat")
    assert os.path.getsize(tmp_path / "tp.png") > 0
    import render_tables
    assert ("each window on quiet CPUs" in render_tables.render(str(out))) is d["settings"]["quiet_start"]


def test_throughput_per_element_row_is_the_tap_gathers_ab(monkeypatch):
    """fused-triton-per-element-graph: the hand-graphed fused row with the implicit GEMM's per-tap gathers off (the
    A/B of this change on a GPU); every other Triton row has them as configured; it is a fused row, not a
    baseline."""
    import throughput
    from resnet_fused.ops import implicit_gemm
    monkeypatch.setattr(implicit_gemm, "TAP_BLOCKS", True)
    monkeypatch.setattr(throughput, "TAP_BLOCKS_DEFAULT", True)
    cpu = torch.device("cpu")
    throughput.make_model("resnet8", "fused-triton-per-element-graph", 1, cpu, True)
    assert implicit_gemm.TAP_BLOCKS is False
    throughput.make_model("resnet8", "fused-triton-graph", 1, cpu, True)
    assert implicit_gemm.TAP_BLOCKS is True
    assert "fused-triton-per-element-graph" not in throughput.BASELINES
    assert throughput.skip_reason("fused-triton-per-element-graph", cpu) == "needs a CUDA GPU (Triton)"


def test_throughput_plot_only_draws_a_saved_json(tmp_path):
    import glob

    import throughput
    saved = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "bench", "results", "throughput-*.json")))[0]
    png = tmp_path / "chart.png"
    throughput.main(["--plot-only", saved, "--png", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ext_ops_tool_charges_each_operator_its_compulsory_bytes(tmp_path):
    from resnet_fused import ext
    if not ext.available():
        pytest.skip("the extension is not built")
    import ext_ops
    out = tmp_path / "ext_ops.json"
    result = ext_ops.main(["--device", "cpu", "--dry-run", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 18 == len(result["rows"])  # 6 operators x 3 shapes
    per_act = {"bn_stats": 1, "bn_stats_backward": 2, "scale_shift_add_relu": 3, "scale_shift_add_relu_backward": 5,
               "batch_norm_add_relu": 3, "batch_norm_add_relu_backward": 5}
    for r in rows:
        n, c, h, w = r["shape"]
        assert r["mbytes"] * 1e6 == per_act[r["operator"]] * n * c * h * w * 4
        assert r["us"] > 0 and r["copy_us"] > 0
        assert r["gb_per_s"] == pytest.approx(r["mbytes"] * 1e6 / (r["us"] * 1e-6) / 1e9)
        assert r["vs_copy"] == pytest.approx(r["us"] / r["copy_us"])


def test_time_to_accuracy_tiny_cpu(tmp_path, mnist_root):
    """Two seeds of one implementation with the best recipe (rotations, zooms, label smoothing, weight EMA): the
    clock, the targets and the summary over seeds."""
    import time_to_accuracy
    out = tmp_path / "tta.json"
    time_to_accuracy.main(["--device", "cpu", "--model", "resnet8", "--impls", "reference", "--subset", "256",
                           "--recipe", "best", "--epochs", "2", "--batch-size", "64", "--seeds", "0,1",
                           "--targets", "0.0,0.995", "--data-root", mnist_root, "--json", str(out)])
    d = json.loads(out.read_text())
    assert d["complete"] is True and d["settings"]["recipe_config"]["ema"] > 0
    assert [(r["impl"], r["seed"]) for r in d["results"]] == [("reference", 0), ("reference", 1)]
    for r in d["results"]:
        assert r["warmup_s"] > 0 and r["eval_s"] > 0 and len(r["history"]) == 2
        assert 0 < r["history"][0]["train_seconds"] < r["history"][1]["train_seconds"]
        assert [h["images"] for h in r["history"]] == [256, 512]  # 4 batches of 64 per epoch (drop_last)
        assert all(0 < h["train_loss"] < 5 for h in r["history"])
        # 0% is reached at the first epoch's end, 99.5% (nearly) never by a ResNet-8 on 256 images
        assert r["seconds_to"]["0.0%"] == r["history"][0]["train_seconds"] and r["images_to"]["0.0%"] == 256
        assert r["seconds_to"]["99.5%"] is None and 0 <= r["final_test_acc"] <= 1
    (s,) = d["summary"]
    accs = [r["final_test_acc"] for r in d["results"]]
    assert s["impl"] == "reference" and s["seeds"] == [0, 1] and s["reached_0.0%"] == 2
    assert s["final_acc_mean"] == pytest.approx(sum(accs) / 2) and s["seconds_to_99.5%"] is None
    assert d["parity"] == []  # no fused row to compare
    fake = [dict(impl=i, seed=0, final_test_acc=acc, history=[dict(train_loss=l0), dict(train_loss=l1)])
            for i, acc, l0, l1 in (("reference", 0.99, 1.0, 0.5), ("fused", 0.995, 1.01, 0.49))]
    (p,) = time_to_accuracy.parity(fake)
    assert p["seed"] == 0 and p["max_rel_train_loss_diff"] == pytest.approx(0.02)
    assert p["final_acc_diff_points"] == pytest.approx(0.5)


def test_host_overhead_tool(tmp_path):
    """bench/host_overhead.py replaces every Triton launch with a no-op (module-wide), so it runs in its own
    process; its JSON counts the launches a training step would make."""
    import subprocess
    out = tmp_path / "host.json"
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "host_overhead.py")
    subprocess.run([sys.executable, script, "--model", "resnet8", "--steps", "1", "--json", str(out)], check=True,
                   timeout=300)
    d = json.loads(out.read_text())
    assert d["fused_host_ms"] > 0 and d["reference_host_ms"] > 0
    # resnet8: 7 convs (a conv launch forward, input and weight gradients backward) and the BN / shortcut /
    # running-statistics / head kernels: a few dozen launches, never zero
    assert 20 <= d["triton_launches_per_step"] <= 200
    assert d["kernel_ops_per_step"] == sum(d["kernel_ops"].values()) > 0
    assert any(k.startswith("resnet_fused.") for k in d["kernel_ops"])
    # the GPU-kernel count looks inside the Python custom ops too (their allocations are not kernels, copies are)
    inner = d["aten_ops_inside_custom_ops"]
    assert d["custom_op_bodies_counted"] >= d["kernel_ops"]["resnet_fused.conv_bn_train"] > 0
    assert "aten.empty" not in inner and "aten.permute" not in inner
    # the launch diet, per conv: one forward launch, the weight gradient, the input gradient (the stem's has none);
    # per block one bn_add_relu launch each way; one running-statistics update; the head one launch each way; and
    # no ATen kernel inside the custom ops
    launches = d["triton_launches"]
    assert launches["conv_kernel"] == 2 * 7 - 1 and launches["conv_wgrad_kernel"] == 7
    assert launches["bn_running_update_kernel"] == 1 and launches["pool_linear_fwd_kernel"] == 1
    assert not inner and d["gpu_kernels_per_step"] <= 42
    outer = sum(v for k, v in d["kernel_ops"].items() if not k.startswith("resnet_fused."))
    assert d["gpu_kernels_per_step"] == d["triton_launches_per_step"] + outer + sum(inner.values())
    assert d["reference_gpu_kernels_per_step"] > 0 and d["fused_host_us"] > 0
    assert d["fused_host_cpu_us"] > 0 and d["reference_host_cpu_us"] > 0 and d["threads"] == 1
    assert d["host_cpu_ratio"] == pytest.approx(d["fused_host_cpu_us"] / d["reference_host_cpu_us"])


@pytest.mark.parametrize("doc", ["README.md", "docs/RESULTS.md"])
def test_readme_speed_tables_are_rendered_from_the_committed_json(doc):
    """The README's and docs/RESULTS.md's throughput and accuracy tables are scripts/render_tables.py's output for
    the JSON each block names."""
    import render_tables
    text = open(os.path.join(os.path.dirname(__file__), "..", doc)).read()
    blocks = render_tables.BLOCK.findall(text)
    assert blocks, f"{doc} has no <!-- throughput-table: ... --> block"
    for _, path, body, _ in blocks:
        assert body == render_tables.render(path), f"{doc} table for {path} is out of date: run render_tables.py"
    for _, paths, body, _ in render_tables.ACCURACY.findall(text):
        assert body == render_tables.render_accuracy(paths), f"{doc} accuracy table for {paths} is out of date"
    if doc == "README.md":
        assert render_tables.ACCURACY.findall(text), "the README has no accuracy table"
        assert len(text.splitlines()) <= 250, "the README is for a newcomer: at most 250 lines (details in docs/)"


DOCS = ["README.md", "docs/RESULTS.md", "docs/GUIDE.md", "docs/ARCHITECTURE.md", "bench/results/README.md",
        "results/recipes/README.md"]
# a path the docs name as a file of this repository: results, scripts, code (not command lines: they name outputs)
CITED = re.compile(r"`((?:bench/|\.\./)*(?:results|docs|scripts|bench|resnet_fused|tests|csrc)/[\w./*{},-]*\w)`"
                   r"|\]\(([\w./-]+\.(?:png|md|json|csv))\)")


def _cited_paths(doc):
    root = os.path.join(os.path.dirname(__file__), "..")
    text = open(os.path.join(root, doc)).read()
    for m in CITED.finditer(text):
        path = m.group(1) or os.path.normpath(os.path.join(os.path.dirname(doc), m.group(2)))
        if m.group(2) is None and doc.startswith("bench/results/") and path.startswith("../"):
            path = os.path.normpath(os.path.join("bench/results", path))
        if "N-" in path or "DIR" in path or "..." in path or "seed/" in path or path.endswith("seed"):
            continue  # a placeholder in a description of a command
        yield path


@pytest.mark.parametrize("doc", DOCS)
def test_the_docs_cite_only_files_that_are_in_the_tree(doc):
    """Every result file, figure, script or module the docs name exists (results pruned to what the docs cite must
    not leave a dangling reference); bench/results/README.md's table lists every file in bench/results/ and its
    superseded runs are out of the tree."""
    import glob
    root = os.path.join(os.path.dirname(__file__), "..")
    missing = []
    for path in _cited_paths(doc):
        pattern = re.sub(r"\{[^}]*\}", "*", path)
        if not glob.glob(os.path.join(root, pattern)):
            missing.append(path)
    assert not missing, f"{doc} names files that are not in the tree: {missing}"
    if doc == "bench/results/README.md":
        text = open(os.path.join(root, doc)).read()
        current, history = text.split("## Superseded runs")
        history = history.split("\n## ")[0]
        cell = lambda line: re.findall(r"`([^`]+)`", line.split("|")[1])  # noqa: E731
        listed = {name for line in current.splitlines() if line.startswith("| `") for name in cell(line)}
        here = {f for f in os.listdir(os.path.join(root, "bench", "results")) if f != "README.md"}
        unlisted = [f for f in here if f not in listed]
        assert not unlisted, f"bench/results files the README does not describe: {sorted(unlisted)}"
        gone = [n for line in history.splitlines() if line.startswith("| `") for n in cell(line)[:1]
                if os.path.exists(os.path.join(root, "bench", "results", n))]
        assert not gone, f"superseded runs still in the tree: {gone}"


def test_render_tables_shows_best_baseline_and_fused_ratio(tmp_path):
    import render_tables
    rows = [dict(model="resnet20", mode="train", precision="fp32", batch=8, impl=i, status="ok", images_per_s=v,
                 step_ms=8e3 / v, gflop_per_step=1e-3, mb_per_step=1e-3)
            for i, v in (("eager", 100.0), ("compile", 150.0), ("eager-graph", 120.0), ("fused-triton-graph", 300.0))]
    rows.append(dict(model="resnet20", mode="train", precision="fp32", batch=8, impl="fused-cuda", status="skipped",
                     reason="x"))
    path = tmp_path / "t.json"
    path.write_text(json.dumps(dict(environment=dict(device_name="X", torch="2", triton="3", git_commit="abcdef0123",
                                                     date="2026-01-01"),
                                    peaks=dict(fp32=1.0, bf16=1.0, bandwidth=1.0), settings={}, rows=rows)))
    md = render_tables.render(os.path.relpath(path, render_tables.ROOT))
    assert "| resnet20 | train | fp32 | 8 | 100 | 120 | 150 | 300 | compile | **2.00×** |" in md
    assert "`fused-cuda`" in md and "commit abcdef0" in md


def test_kernel_report_compiles_the_workloads_kernels_for_sm90(tmp_path):
    """bench/kernel_report.py on a tiny workload: every kernel the inference step launches is compiled for sm_90
    (no GPU) and measured, in the configurations a GPU launches (not the interpreter's): the convolutions' GPU
    tiles, TF32 tensor cores for fp32 as cudnn.allow_tf32 (IEEE fp32 without: no tensor cores), bf16 on tensor
    cores."""
    import subprocess
    out = tmp_path / "kr.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "kernel_report.py")
    from resnet_fused.ops import implicit_gemm as ig
    gpu_tiles = {(c["BLOCK_M"], c["num_warps"]) for c in ig.CONV_CONFIGS[:3]}
    for tf32 in (True, False):
        r = subprocess.run([sys.executable, script, "--model", "resnet8", "--batch", "2", "--modes", "inference",
                            "--shortcuts", "A", "--tf32", "on" if tf32 else "off", "--json", str(out)]
                           + ([] if tf32 else ["--precisions", "fp32"]),
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        d = json.loads(out.read_text())
        assert d["target"] == "sm_90" and d["workloads"] == ["A/inference/fp32", "A/inference/bf16"][:1 + tf32]
        assert d["launch_choices"] == dict(sms=132, tf32=tf32)
        ks = d["kernels"]
        assert ks and all(k["regs"] and k["regs"] == k["regs_cubin"] and k["sass"] > 0 for k in ks)
        assert all(isinstance(k["spill_bytes"], int) and k["ldg_vec"] <= k["ldg"] for k in ks)
        convs = {w: [k for k in ks if k["kernel"] == "conv_kernel" and any(w in u for u in k["workloads"])]
                 for w in ("fp32", "bf16")}
        assert convs["fp32"] and bool(convs["bf16"]) == tf32
        assert all((k["constexprs"]["BLOCK_M"], k["num_warps"]) in gpu_tiles for k in convs["fp32"] + convs["bf16"])
        assert all(k["mma"] > 0 for k in convs["bf16"])
        assert all((k["mma"] > 0) == tf32 for k in convs["fp32"])
        assert "kernel configurations compiled for sm_90" in r.stdout and d["driver_checked"] is False


def test_kernel_report_compiles_torchvision_training_without_spills(tmp_path):
    """torchvision's ResNet-18 training step at 224x224, batch 64 (the GPU tiles, TF32): every kernel compiles for
    sm_90 without spills (the input-gradient conv with BN's backward on load spilled 80 bytes at 64 channels on
    4 warps before it got 8)."""
    import subprocess
    out = tmp_path / "kr.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "kernel_report.py")
    r = subprocess.run([sys.executable, script, "--model", "tv-resnet18", "--size", "224", "--batch", "64",
                        "--modes", "train", "--precisions", "fp32", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["workloads"] == ["tv-resnet18/train/fp32"] and d["size"] == 224
    heavy = [k for k in d["kernels"] if k["constexprs"].get("PRO") == 2 and k["constexprs"].get("STATS") == 2]
    assert any(k["constexprs"]["BLOCK_M"] == 128 and k["num_warps"] == 8 for k in heavy)
    assert all(k["spill_bytes"] == 0 for k in d["kernels"]), [(k["kernel"], k["constexprs"]) for k in d["kernels"]
                                                               if k["spill_bytes"]]


def test_recipe_runs_summarizes_groups_of_runs(tmp_path):
    """resnet_fused/experiments/recipe_runs.py: per run the last epoch's test accuracy (EMA's where the run had it) and the trained
    weights' beside it; per group mean/min/max and the difference of means from the first group."""
    from resnet_fused.experiments import recipe_runs

    def run(name, accs, raw=None, times=None):
        d = tmp_path / name
        d.mkdir()
        rows = [dict(epoch=i + 1, train_loss=1.0, test_acc=a, epoch_time_s=(times or [10.0] * len(accs))[i])
                for i, a in enumerate(accs)]
        for r, x in zip(rows, raw or []):
            r["test_acc_raw"] = x
        (d / "metrics.json").write_text(json.dumps(rows))
        return str(d)
    b0 = run("b0", [0.990, 0.9981, 0.9976], raw=[0.98, 0.995, 0.9970], times=[10.0, 20.0, 30.0])
    b1 = run("b1", [0.991, 0.9974, 0.9978], raw=[0.98, 0.996, 0.9962])
    a0 = run("a0", [0.990, 0.9968])
    a1 = run("a1", [0.990, 0.9964, 0.9970])
    out = recipe_runs.main(["--group", f"best={b0},{b1}", "--group", f"ablation={a0},{a1}",
                            "--json", str(tmp_path / "r.json")])
    best, abl = out["groups"]
    assert out["baseline"] == "best" and [r["dir"] for r in best["runs"]] == [b0, b1]
    assert best["final_acc"] == pytest.approx(dict(mean=99.77, min=99.76, max=99.78, n=2))
    assert best["trained_weights_acc"] == pytest.approx(dict(mean=99.66, min=99.62, max=99.70, n=2))
    r0 = best["runs"][0]
    assert r0["epochs"] == 3 and r0["train_time_s"] == pytest.approx(60.0)
    assert r0["peak_acc_chosen_on_test"] == pytest.approx(99.81) and r0["peak_epoch"] == 2
    assert best["same_length"] and "diff_from_baseline_points" not in best
    assert abl["trained_weights_acc"] is None and not abl["same_length"]
    assert abl["final_acc"]["mean"] == pytest.approx(99.69)
    assert abl["diff_from_baseline_points"] == pytest.approx(99.69 - 99.77)
    assert json.loads((tmp_path / "r.json").read_text())["groups"][1]["label"] == "ablation"
    for bad in ([f"{b0}"], ["best="], [f"={b0}"]):
        with pytest.raises(SystemExit):
            recipe_runs.main(["--group", *bad])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.json").write_text("[]")
    with pytest.raises(ValueError, match="no finished epoch"):
        recipe_runs.main(["--group", f"x={empty}"])


def test_recipe_parity_compares_train_runs(tmp_path):
    """resnet_fused/experiments/recipe_parity.py: per-epoch relative training-loss difference and final accuracy difference of two
    train.py runs (metrics.json), the 1% / 0.05-point verdicts, unfinished runs compared over common epochs."""
    from resnet_fused.experiments import recipe_parity

    def run(name, losses, accs):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps(
            [dict(epoch=i + 1, train_loss=l, test_acc=a) for i, (l, a) in enumerate(zip(losses, accs))]))
        return str(d)
    ref = run("ref", [0.5, 0.100, 0.0500], [0.98, 0.990, 0.9950])
    ok = run("ok", [0.501, 0.1005, 0.0502], [0.97, 0.991, 0.9954])
    bad = run("bad", [0.5, 0.103], [0.98, 0.9890])
    out = recipe_parity.main(["--pair", f"0:{ok}:{ref}", "--pair", f"1:{bad}:{ref}", "--json",
                              str(tmp_path / "p.json")])
    s0, s1 = out["seeds"]
    assert s0["finished"] and s0["loss_within_1pct"] and s0["acc_within_0_05"]
    assert s0["max_rel_train_loss_diff"] == pytest.approx(0.005)
    assert s0["final_acc_diff_points"] == pytest.approx(0.04)
    assert not s1["finished"] and s1["epochs_compared"] == 2
    assert not s1["loss_within_1pct"] and s1["max_rel_train_loss_diff"] == pytest.approx(0.03)
    assert s1["final_acc_diff_points"] == pytest.approx(-0.1) and not s1["acc_within_0_05"]
    assert out["summary"]["fused_acc"]["mean"] == pytest.approx((99.54 + 98.9) / 2)
    assert json.loads((tmp_path / "p.json").read_text())["seeds"][1]["seed"] == 1
    assert s0["mean_rel_train_loss_diff"] == pytest.approx((0.002 + 0.005 + 0.004) / 3)
    with pytest.raises(SystemExit):
        recipe_parity.main(["--pair", f"{ok}:{ref}"])
    # a control run (the reference perturbed by 1e-6): its drift from the reference beside the fused run's
    ctl = run("ctl", [0.49, 0.102, 0.0510, 0.04], [0.98, 0.990, 0.9948, 0.996])
    out = recipe_parity.main(["--pair", f"0:{ok}:{ref}:{ctl}"])
    s0 = out["seeds"][0]
    assert s0["finished"] is False and s0["epochs_compared"] == 3  # the control ran one epoch more
    assert s0["control_max_rel_train_loss_diff"] == pytest.approx(0.02) and not s0["control_loss_within_1pct"]
    assert s0["control_mean_rel_train_loss_diff"] == pytest.approx((0.02 + 0.02 + 0.02) / 3)
    assert s0["control_final_acc_diff_points"] == pytest.approx(-0.02)
    assert [e["control_train_loss"] for e in s0["epochs"]] == [0.49, 0.102, 0.0510]
    assert s0["max_rel_train_loss_diff"] == pytest.approx(0.005)  # the fused comparison unchanged


def test_host_profile_kernel_work_accounting(dev):
    """bench/host_profile.py's per-kernel table: a conv launch's FLOPs (2*M*N*K) and the bytes of its distinct
    tensors, logged at the launch; with device times and peaks the achieved rates and their fractions."""
    import torch

    import host_profile
    from resnet_fused.ops import conv_bn_act  # noqa: F401  (registers the op)
    from resnet_fused.ops.eager import ops
    x = torch.randn(2, 3, 5, 5, device=dev).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 3, 3, 3, device=dev)
    b = torch.randn(8, device=dev)
    with host_profile.LaunchLog(interpreted=dev.type == "cpu") as log:
        out = ops.conv_bn_act(x, w, b, None, None, None, 1, 1, 0, 1, 0, True)
    assert len(log.launches) == 1
    name, flops, nbytes = log.launches[0]
    assert name == "conv_kernel" and flops == 2 * (2 * 5 * 5) * 8 * (9 * 3)
    assert nbytes >= 4 * (x.numel() + w.numel() + b.numel() + out.numel())
    rows = host_profile.kernel_table(log.launches + [("bn_add_relu_fwd_kernel", None, 4e6)],
                                     device_us={"conv_kernel": 2.0, "bn_add_relu_fwd_kernel": 10.0},
                                     peaks=dict(flops=1e12, bandwidth=1e12))
    conv = next(r for r in rows if r["kernel"] == "conv_kernel")
    bn = next(r for r in rows if r["kernel"] == "bn_add_relu_fwd_kernel")
    assert conv["tflops"] == pytest.approx(flops / 2e-6 / 1e12)
    assert conv["frac_peak_flops"] == pytest.approx(flops / 2e-6 / 1e12)
    assert bn["gflop"] is None and bn["tflops"] is None and bn["gbps"] == pytest.approx(400)
    assert bn["frac_peak_bw"] == pytest.approx(0.4)


def test_augment_check_stats_and_precise_bn(mnist_root):
    """The pixel statistics over the augmentations (one resample blurs less than two), and precise BN: the running
    statistics reset and replaced by the exact average over one pass."""
    from resnet_fused.experiments import augment_check
    from resnet_fused.data import DeviceLoader, Split, load_splits
    d = load_splits("mnist", mnist_root, subset=200)
    s = augment_check.stats(d, n=200)
    assert s["plain"]["std"] > s["rotation/zoom + elastic 34, one resample"]["std"] \
        > s["rotation/zoom + elastic 34, two resamples"]["std"]
    assert all(0 < r["above_200"] < r["above_10"] < 1 for r in s.values())
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 255, (96, 1, 6, 6), dtype=torch.uint8, generator=g), torch.zeros(96).long())
    bn = torch.nn.BatchNorm2d(1)
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(7.0)
    loader = DeviceLoader(split, 32, 0.0, 1.0)
    augment_check.recompute_bn(torch.nn.Sequential(bn), loader)
    x = torch.cat([b for b, _ in loader])
    torch.testing.assert_close(bn.running_mean, x.mean().reshape(1), rtol=1e-6, atol=1e-6)
    batch_vars = torch.stack([b.var() for b, _ in loader])  # unbiased per batch, averaged over the pass
    torch.testing.assert_close(bn.running_var, batch_vars.mean().reshape(1), rtol=1e-6, atol=1e-6)


def test_lockstep_logs_the_three_runs_from_the_recipe(mnist_root, tmp_path):
    """resnet_fused.experiments.lockstep: FusedResNet, the reference and the perturbed reference start from the
    same weights (their first losses agree to rounding) and train with the recipe's settings, recorded in the log."""
    from resnet_fused.experiments import lockstep
    out = tmp_path / "ls.json"
    lockstep.main(["--steps", "2", "--lr", "0.05", "--data-root", mnist_root, "--json", str(out)])
    d = json.loads(out.read_text())
    assert d["recipe_config"]["recipe"] == "fast" and d["recipe_config"]["lr"] == 0.05 and len(d["log"]) == 2
    first = d["log"][0]
    assert first["fused"] == pytest.approx(first["reference"], rel=1e-4)
    assert first["perturbed"] == pytest.approx(first["reference"], rel=1e-4)


def test_cpu_inference_engines_compute_the_models_logits_and_are_rows(tmp_path):
    """bench/engines.py: each engine that is installed returns the reference model's logits (it is a baseline of
    the same computation); as throughput rows they are inference-only, and a missing package is a skipped row that
    says what to install. The torchvision models run as tv-NAME rows at --tv-size."""
    import importlib.util

    import engines
    import throughput
    from resnet_fused import build_model
    model = build_model("resnet8").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
        for impl in engines.ENGINES:
            if engines.skip_reason(impl, torch.device("cpu"), "inference", "fp32") is None:
                got = engines.make(impl, model, x)(x)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=impl)
    out = tmp_path / "tp.json"
    throughput.main(["--device", "cpu", "--models", "resnet8,tv-resnet18", "--tv-size", "32", "--batch-sizes", "2",
                     "--modes", "train,inference", "--impls", "eager,onnxruntime,openvino,fused-cpu",
                     "--iters", "1", "--repeats", "2", "--no-isolate", "--json", str(out), "--png", "",
                     "--no-progress"])
    rows = {(r["model"], r["mode"], r["impl"]): r for r in json.loads(out.read_text())["rows"]}
    for model_name in ("resnet8", "tv-resnet18"):
        assert rows[(model_name, "inference", "fused-cpu")]["status"] == "ok"
        assert rows[(model_name, "train", "fused-cpu")]["status"] == "ok"
        for impl in ("onnxruntime", "openvino"):
            assert rows[(model_name, "train", impl)]["reason"] == "an inference engine (no training)"
            row = rows[(model_name, "inference", impl)]
            installed = importlib.util.find_spec(impl) is not None
            assert row["status"] == "ok" if installed else row["reason"] == f"pip install {impl}"


def test_isolated_windows_wait_for_quiet_cpus(monkeypatch):
    """bench_isolated starts a window once the CPUs were idle for one interval (another row's process may keep its
    threads spinning after its own window), and gives up waiting after max_s."""
    import throughput
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    ticks = iter([(0, 0), (10, 100), (20, 200), (110, 300), (111, 400)])  # 90% busy, 90% busy, then 10% busy
    monkeypatch.setattr(throughput, "cpu_times", lambda: next(ticks))
    calls = []
    monkeypatch.setattr(throughput.time, "sleep", lambda s: calls.append(s))
    throughput.wait_until_quiet(max_s=60, busy=0.1, interval=0.01)
    assert len(calls) == 3
    monkeypatch.setattr(throughput, "cpu_times", lambda: (0, len(calls) * 100))  # always busy
    waited = throughput.wait_until_quiet(max_s=0.05, interval=0.0)
    assert 0.05 <= waited < 1
