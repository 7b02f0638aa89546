"""The training and evaluation CLIs: a short run learns, resume is exact, bad input is one clear line."""
import dataclasses
import os

import pytest
import torch

from resnet_fused import evaluate, train
from resnet_fused.checkpoint import load_checkpoint, seal

pytestmark = pytest.mark.slow


def run_train(argv):
    return train.train(argv)


def base_args(root, out, *extra):
    return ["--data-root", root, "--out", str(out), "--device", "cpu", "--subset", "1000", "--batch-size", "100",
            "--no-progress", *extra]


def test_short_training_lowers_the_loss_and_writes_its_files(mnist_root, tmp_path):
    hist = run_train(base_args(mnist_root, tmp_path, "--model", "resnet8", "--epochs", "3", "--lr", "0.05",
                               "--warmup-epochs", "0"))
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] * 0.8
    assert hist[-1]["test_acc"] > 0.3  # chance is 0.1
    for name in ("metrics.csv", "metrics.json", "last.pt", "best.pt", "curves.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["epoch"] == 3 and not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert {"optimizer", "scheduler", "rng", "config", "history"} <= set(ckpt)
    res = evaluate.evaluate([str(tmp_path / "best.pt"), "--data-root", mnist_root, "--device", "cpu"])
    assert res["accuracy"] == pytest.approx(max(h["test_acc"] for h in hist))
    conf = torch.tensor(res["confusion_matrix"])
    assert conf.shape == (10, 10) and conf.sum() == 1000


@pytest.mark.parametrize("extra", [(), ("--recipe", "best", "--ema", "0.9")])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(mnist_root, tmp_path, extra):
    """Also with the best recipe's rotations/zooms, label smoothing and weight EMA (saved and restored)."""
    args = ("--model", "resnet8", "--epochs", "2", "--no-plot", *extra)
    full = run_train(base_args(mnist_root, tmp_path / "full", *args))
    run_train(base_args(mnist_root, tmp_path / "split", *args, "--stop-after-epoch", "1"))
    resumed = run_train(base_args(mnist_root, tmp_path / "split", *args[2:4], "--resume"))
    for key in ("train_loss", "test_acc") + (("test_acc_raw",) if extra else ()):
        assert [h[key] for h in resumed] == pytest.approx([h[key] for h in full], rel=1e-5), key
    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "split" / "last.pt"))
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, msg=lambda m: f"{k}: {m}")
    assert ("ema" in a) == bool(extra)
    if extra:
        assert b["config"]["recipe"] == "best" and b["ema"]["updates"] == a["ema"]["updates"] == 20
        for k, v in a["ema"]["model"].items():
            torch.testing.assert_close(b["ema"]["model"][k], v, msg=lambda m: f"ema {k}: {m}")


def test_recipes_set_defaults_that_flags_override(mnist_root, tmp_path, capsys):
    from resnet_fused.run_config import FIELDS
    from resnet_fused.train import DEFAULTS, RECIPES, build_parser, resolve_config
    for name, rec in RECIPES.items():
        values = {k: getattr(rec, k) for k in FIELDS if getattr(rec, k) != getattr(DEFAULTS, k) and k != "recipe"}
        cfg = resolve_config(build_parser().parse_args(["--recipe", name]))[0]
        assert cfg.recipe == name and {k: getattr(cfg, k) for k in values} == values
        assert all(getattr(cfg, k) == getattr(DEFAULTS, k) for k in FIELDS if k not in values and k != "recipe")
    cfg = resolve_config(build_parser().parse_args(["--recipe", "fast", "--epochs", "3", "--lr", "0.05"]))[0]
    assert (cfg.epochs, cfg.lr, cfg.schedule) == (3, 0.05, RECIPES["fast"].schedule)
    # a recipe's net is a default too: --model replaces it, the rest of the recipe stays
    cfg = resolve_config(build_parser().parse_args(["--recipe", "best", "--model", "resnet20"]))[0]
    assert RECIPES["best"].model != "resnet20"
    assert cfg.model == "resnet20" and cfg.epochs == RECIPES["best"].epochs
    assert resolve_config(build_parser().parse_args([]))[0].recipe == "default"
    # the recipe's augmentations reach the training loader
    from resnet_fused.data import Split
    cfg = resolve_config(build_parser().parse_args(["--recipe", "best", "--erase", "0.3", "--max-shift", "3",
                                                   "--elastic", "8"]))[0]
    data = dict(train=Split(torch.zeros(300, 1, 8, 8, dtype=torch.uint8), torch.zeros(300, dtype=torch.long)),
                mean=0.1, std=0.3)
    loader = train.make_train_loader(data, cfg, 100)
    assert (loader.rotate, loader.scale, loader.erase, loader.elastic, loader.max_shift, loader.seed) == (
        RECIPES["best"].rotate, RECIPES["best"].scale, 0.3, 8.0, 3, cfg.seed)
    # a recipe's run resumes with its own recipe: another one is refused, none given keeps it
    out = tmp_path / "run"
    run_train(base_args(mnist_root, out, "--model", "resnet8", "--recipe", "fast", "--epochs", "2", "--subset",
                        "200", "--stop-after-epoch", "1", "--no-plot"))
    err = cli_error(capsys, train.main, base_args(mnist_root, out, "--recipe", "best", "--subset", "200", "--resume"))
    assert "--recipe best does not match" in err and "(fast)" in err
    hist = run_train(base_args(mnist_root, out, "--subset", "200", "--resume", "--no-plot"))
    assert len(hist) == 2 and load_checkpoint(str(out / "last.pt"))["config"]["recipe"] == "fast"
    for bad, what in ((("--ema", "1"), "--ema must be below 1"), (("--scale", "1.5"), "--scale must be below 1"),
                      (("--rotate", "200"), "--rotate must be"), (("--ema", "-0.1"), "--ema must be"),
                      (("--erase", "1.5"), "--erase must be at least 0.0 and at most 1.0"),
                      (("--elastic", "-2"), "--elastic must be at least 0.0")):
        assert what in cli_error(capsys, train.main, base_args(mnist_root, tmp_path / "bad", *bad))
    assert not (tmp_path / "bad").exists()


def test_evaluate_uses_the_ema_weights_of_an_ema_run(mnist_root, tmp_path, capsys):
    hist = run_train(base_args(mnist_root, tmp_path / "run", "--model", "resnet8", "--epochs", "1", "--subset",
                               "200", "--ema", "0.5", "--no-plot"))
    ckpt = str(tmp_path / "run" / "last.pt")
    common = ["--data-root", mnist_root, "--device", "cpu"]
    ema = evaluate.evaluate([ckpt, *common])
    trained = evaluate.evaluate([ckpt, *common, "--weights", "trained"])
    assert (ema["weights"], trained["weights"]) == ("ema", "trained")
    assert ema["accuracy"] == pytest.approx(hist[-1]["test_acc"])
    assert trained["accuracy"] == pytest.approx(hist[-1]["test_acc_raw"])
    assert ema["loss"] != trained["loss"]
    run_train(base_args(mnist_root, tmp_path / "plain", "--model", "resnet8", "--epochs", "1", "--subset", "200",
                        "--no-plot"))
    err = cli_error(capsys, evaluate.main, [str(tmp_path / "plain" / "last.pt"), *common, "--weights", "ema"])
    assert "no weight EMA" in err


def cli_error(capsys, fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_errors(mnist_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert "unknown model" in cli_error(capsys, train.main, base_args(mnist_root, out, "--model", "resnet9000x"))
    assert "depth 21" in cli_error(capsys, train.main, base_args(mnist_root, out, "--model", "resnet21"))
    assert "unknown dataset" in cli_error(capsys, train.main, base_args(mnist_root, out, "--dataset", "cifar"))
    err = cli_error(capsys, train.main, base_args(str(tmp_path / "nodata"), out))
    assert "not found" in err and "--download" in err and "train-images-idx3-ubyte" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "not writable" in cli_error(capsys, train.main, base_args(mnist_root, blocker / "sub"))
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "corrupt" in cli_error(capsys, evaluate.main, [str(bad), "--device", "cpu"])
    assert "corrupt" in cli_error(capsys, train.main, base_args(mnist_root, out, "--resume", str(bad)))
    assert "does not exist" in cli_error(capsys, evaluate.main, [str(tmp_path / "missing.pt")])


def test_degradation_experiment_quick(mnist_root, tmp_path):
    from resnet_fused.experiments import degradation
    rows = degradation.run(["--models", "plain8,resnet8", "--epochs", "1", "--subset", "300", "--data-root",
                            mnist_root, "--device", "cpu", "--out", str(tmp_path)])
    assert {r["model"] for r in rows} == {"plain8", "resnet8"}
    assert os.path.getsize(tmp_path / "degradation.png") > 0 and os.path.getsize(tmp_path / "degradation.csv") > 0


def test_evaluate_writes_confusion_matrix_and_misclassified_digits(mnist_root, tmp_path):
    run_train(base_args(mnist_root, tmp_path / "run", "--model", "resnet8", "--epochs", "1", "--subset", "200",
                        "--no-plot"))
    plots = tmp_path / "plots"
    res = evaluate.evaluate([str(tmp_path / "run" / "last.pt"), "--data-root", mnist_root, "--device", "cpu",
                             "--plots", str(plots)])
    wrong = int(round((1 - res["accuracy"]) * 200))
    assert res["misclassified_shown"] == min(64, wrong)
    for name in ("confusion_matrix.png", "misclassified.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # the images shown are the misclassified ones, in test-set order, with their true labels
    from resnet_fused.data import DeviceLoader, load_splits
    from resnet_fused.train import make_model
    from resnet_fused.checkpoint import load_model_state
    ckpt = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    d = load_splits("mnist", mnist_root, subset=200)
    model = make_model(ckpt["config"], 1, 10, torch.device("cpu"))
    load_model_state(model, ckpt["model"], "ckpt")
    loader = DeviceLoader(d["test"], 1000, ckpt["config"]["mean"], ckpt["config"]["std"])
    imgs, true, pred = evaluate.misclassified(model, d["test"], loader, torch.device("cpu"), "off")
    x = next(iter(loader))[0]
    with torch.no_grad():
        p = model.eval()(x).argmax(1)
    idx = (p != d["test"].labels).nonzero().flatten()[:64]
    assert true == d["test"].labels[idx].tolist() and pred == p[idx].tolist()
    assert all(torch.equal(a, d["test"].images[i, 0]) for a, i in zip(imgs, idx.tolist()))


def test_evaluate_several_checkpoints_as_an_ensemble(mnist_root, tmp_path, capsys):
    """The mean of the members' softmax probabilities (members of different architectures), each member's own
    accuracy beside it; members evaluated on other data are refused."""
    for name, model, seed in (("a", "resnet8", 0), ("b", "resnet14", 1)):
        run_train(base_args(mnist_root, tmp_path / name, "--model", model, "--epochs", "1", "--subset", "200",
                            "--seed", str(seed), "--lr", "0.05", "--no-plot"))
    paths = [str(tmp_path / n / "last.pt") for n in ("a", "b")]
    common = ["--data-root", mnist_root, "--device", "cpu"]
    res = evaluate.evaluate([*paths, *common, "--plots", str(tmp_path / "plots")])
    singles = [evaluate.evaluate([p, *common]) for p in paths]
    assert [m["accuracy"] for m in res["members"]] == [s["accuracy"] for s in singles]
    assert [m["model"] for m in res["members"]] == ["resnet8", "resnet14"] and res["checkpoint"] == paths
    from resnet_fused.checkpoint import load_model_state
    from resnet_fused.data import DeviceLoader, load_splits
    from resnet_fused.train import make_model
    d = load_splits("mnist", mnist_root, subset=200)
    probs = []
    for p in paths:
        ckpt = load_checkpoint(p)
        model = make_model(ckpt["config"], 1, 10, torch.device("cpu"))
        load_model_state(model, ckpt["model"], p)
        x = next(iter(DeviceLoader(d["test"], 1000, ckpt["config"]["mean"], ckpt["config"]["std"])))[0]
        with torch.no_grad():
            probs.append(model.eval()(x).softmax(1))
    mean = (probs[0] + probs[1]) / 2
    y = d["test"].labels
    assert res["accuracy"] == pytest.approx((mean.argmax(1) == y).double().mean().item())
    assert res["loss"] == pytest.approx(torch.nn.functional.nll_loss(mean.log(), y).item(), rel=1e-5)
    # the ensemble's predictions are not one member's (else the average would be untested)
    assert not all((mean.argmax(1) == q.argmax(1)).all() for q in probs)
    assert res["misclassified_shown"] == min(64, int(round((1 - res["accuracy"]) * 200)))
    assert "ensemble of 2" in capsys.readouterr().out
    run_train(base_args(mnist_root, tmp_path / "c", "--model", "resnet8", "--epochs", "1", "--subset", "100",
                        "--no-plot"))
    err = cli_error(capsys, evaluate.main, [paths[0], str(tmp_path / "c" / "last.pt"), *common])
    assert "cannot form an ensemble" in err and "subset differ (200 vs 100)" in err
    assert "given twice" in cli_error(capsys, evaluate.main, [paths[0], paths[0], *common])
    same = os.path.join(os.path.dirname(paths[0]), ".", "last.pt")  # another spelling of the same file
    assert "given twice" in cli_error(capsys, evaluate.main, [paths[0], same, *common])


def test_run_config_is_frozen_validated_and_reads_saved_settings():
    """RunConfig: recipes are dataclasses.replace of the defaults; a run's settings cannot change under it; a
    checkpoint's saved config (with the data's facts, and from before a field existed) reads back."""
    from resnet_fused.checkpoint import UserError
    from resnet_fused.run_config import DEFAULTS, RECIPES, RunConfig, recipe
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.lr = 1.0
    assert RECIPES["fast"] == dataclasses.replace(DEFAULTS, recipe="fast", epochs=2, schedule="onecycle", lr=0.2,
                                                  label_smoothing=0.1)
    assert recipe("fast", lr=None, seed=3) == dataclasses.replace(RECIPES["fast"], seed=3)
    saved = dict(RECIPES["best"].as_dict(), in_channels=1, num_classes=10, mean=0.13, std=0.31, world_size=2)
    del saved["erase"], saved["init_noise"]  # a checkpoint written before these flags existed
    assert RunConfig.from_saved(saved) == RECIPES["best"]
    for bad, msg in ((dict(momentum=1.0), "--momentum must be below 1 "), (dict(lr=0.0), "--lr must be greater"),
                     (dict(warmup_epochs=20.0), "--warmup-epochs 20.0 is longer"),
                     (dict(lr=float("nan")), "--lr must be a finite number")):
        with pytest.raises(UserError, match=msg):
            dataclasses.replace(DEFAULTS, **bad).validate()


def test_init_noise_perturbs_the_initial_weights_and_nothing_else(capsys, tmp_path):
    """The parity runs' control (--init-noise): weights move by about eps relative, the global RNG (hence data
    order and augmentations) is untouched, and a bad value is a one-line error."""
    from resnet_fused.train import DEFAULTS, make_model
    cfg = dataclasses.replace(DEFAULTS, model="resnet8", impl="reference", channels_last=False)
    torch.manual_seed(0)
    a = make_model(cfg, 1, 10, torch.device("cpu"))
    after_a = torch.get_rng_state()
    torch.manual_seed(0)
    b = make_model(dataclasses.replace(cfg, init_noise=1e-6), 1, 10, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), after_a)
    moved = 0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        rel = ((pb.double() - pa.double()).norm() / pa.double().norm().clamp_min(1e-30)).item()
        if pa.abs().sum() == 0:
            assert torch.equal(pa, pb), name  # zeros stay zeros (relative noise)
        else:
            assert 1e-7 < rel < 3e-6, (name, rel)
            moved += 1
    assert moved >= 10
    assert "--init-noise must be" in cli_error(capsys, train.main,
                                               ["--init-noise", "-1", "--out", str(tmp_path / "x"), "--device", "cpu"])
