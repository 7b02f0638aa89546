"""Helpers of the CLI tests: a one-line error's text, a tiny training run's flags, a folder's bytes."""
import os

import pytest

from resnet_fused import train


def cli_error(capsys, fn, argv):
    """fn(argv) exits with status 2 and one line 'error: ...' (no traceback); returns that line."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and "\n" not in err, err
    return err


def base_args(root, out, *extra):
    return ["--data-root", root, "--out", str(out), "--device", "cpu", "--subset", "300", "--batch-size", "100",
            "--model", "resnet8", "--no-progress", "--no-plot", *extra]


def snapshot(folder):
    """Every file in a folder and its bytes (what 'nothing written' is checked against)."""
    if not os.path.isdir(folder):
        return None
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def trained_checkpoint(mnist_root, tmp_path):
    """last.pt of a one-epoch ResNet-8 run on 200 images."""
    out = tmp_path / "run"
    train.train(base_args(mnist_root, out, "--epochs", "1", "--subset", "200"))
    return out / "last.pt"
