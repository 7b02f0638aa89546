"""Train a ResNet on an MNIST-family dataset: ``python -m resnet_fused.train --help``.

The whole dataset lives on the device (see resnet_fused.data); the defaults (ResNet-20, SGD momentum 0.9, lr 0.1
with cosine decay after a one-epoch warm-up, weight decay 5e-4, batch 128, +-2 px translations, 15 epochs) reach
about 99.6% MNIST test accuracy without tuning. Each epoch writes metrics.csv / metrics.json and the checkpoints
last.pt / best.pt (atomically) to --out; --resume continues exactly where a run stopped.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import (UserError, atomic_save, atomic_write_bytes, atomic_write_text, check_writable_dir,
                         clean_stale_temp_files, clean_state_dict, load_checkpoint, load_model_state, run_cli, seal)
from .data import DATASETS, DeviceLoader, load_splits
from .zoo import MODEL_NAMES, build_model, parse_model_name

DEFAULTS = dict(model="resnet20", impl="fused", dataset="mnist", epochs=15, batch_size=128, lr=0.1,
                momentum=0.9, wd=5e-4, schedule="cosine", warmup_epochs=1.0, label_smoothing=0.0, amp="off",
                max_shift=2, val_size=0, subset=0, seed=0, shortcut=None)
# Flags that define the run: on --resume they come from the checkpoint unless given again (and must then agree).
RECIPE_KEYS = tuple(DEFAULTS)


def build_parser():
    # each default is written once, in brackets in its help (the values of the recipe come from DEFAULTS, or from
    # the checkpoint on --resume, so argparse itself holds None for them)
    p = argparse.ArgumentParser(prog="python -m resnet_fused.train", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", help=f"one of {', '.join(MODEL_NAMES)} (or resnetN/plainN) [default resnet20]")
    a("--impl", choices=["reference", "fused"],
      help="fused = FusedResNet (Triton on a GPU, the C++ operators on a CPU, plain PyTorch math where neither is "
           "built), reference = plain PyTorch [fused]")
    a("--shortcut", choices=["A", "B"], help="shortcut option for 6n+2 nets [A]")
    a("--dataset", help=f"one of {', '.join(DATASETS)} [mnist]")
    a("--data-root", default=None, help="dataset root (torchvision layout) [$RESNET_FUSED_DATA or ./data]")
    a("--download", action="store_true", help="download the dataset if it is missing")
    a("--epochs", type=int, help="epochs [15]")
    a("--batch-size", type=int, help="batch size [128]")
    a("--lr", type=float, help="peak learning rate [0.1]")
    a("--momentum", type=float, help="SGD momentum [0.9]")
    a("--wd", type=float, help="weight decay [5e-4]")
    a("--schedule", choices=["multistep", "cosine", "onecycle"], help="learning-rate schedule [cosine]")
    a("--warmup-epochs", type=float, help="linear warm-up for multistep/cosine [1]")
    a("--label-smoothing", type=float, help="[0]")
    a("--max-shift", type=int, help="random translation in pixels, 0 = no augmentation [2]")
    a("--val-size", type=int, help="images carved from train for validation; best.pt then follows val [0]")
    a("--subset", type=int, help="use only the first N training (and test) images, 0 = all [0]")
    a("--amp", choices=["off", "bf16", "fp16"], help="autocast dtype [off]")
    a("--channels-last", action="store_true", help="channels_last memory format")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--seed", type=int, help="[0]")
    a("--device", default=None, help="cuda, cpu, cuda:1 ... [cuda if available]")
    a("--out", default="runs/train", help="output directory [runs/train]")
    a("--resume", nargs="?", const="auto", default=None,
      help="continue a run: a checkpoint path, or no value for OUT/last.pt")
    a("--overwrite", action="store_true", help="allow replacing the checkpoints of another run in --out")
    a("--stop-after-epoch", type=int, default=None,
      help="end this invocation after that epoch (the schedule still spans --epochs; continue with --resume)")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--no-plot", action="store_true", help="skip the PNG of the training curves")
    return p


# ---- pieces ---------------------------------------------------------------------------------------------------

def pick_device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available on this machine")
    return dev


def lr_factor(step, steps_per_epoch, cfg):
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) for the schedule in cfg."""
    total = max(1, cfg["epochs"] * steps_per_epoch)
    warm = int(cfg["warmup_epochs"] * steps_per_epoch) if cfg["schedule"] != "onecycle" else 0
    if step < warm:
        return (step + 1) / warm
    if cfg["schedule"] == "multistep":
        e = step / steps_per_epoch
        return 0.1 ** sum(e >= m * cfg["epochs"] for m in (0.5, 0.75))
    if cfg["schedule"] == "cosine":
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    # onecycle: linear up for 30% to the peak, then cosine down to 1/1000 of the starting value (start = peak/25)
    up = max(1, int(0.3 * total))
    start, end = 1 / 25, 1 / 25 / 1e3
    if step < up:
        return start + (1 - start) * step / up
    t = (step - up) / max(1, total - up)
    return end + (1 - end) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def rng_state():
    """Every generator's state as tensors and plain values (what a weights_only checkpoint may hold)."""
    ns = np.random.get_state(legacy=False)
    numpy_state = dict(bit_generator=ns["bit_generator"], key=torch.from_numpy(ns["state"]["key"].astype(np.int64)),
                       pos=int(ns["state"]["pos"]), has_gauss=int(ns["has_gauss"]), gauss=float(ns["gauss"]))
    s = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=numpy_state)
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    ns = s["numpy"]
    np.random.set_state(dict(bit_generator=ns["bit_generator"],
                             state=dict(key=ns["key"].numpy().astype(np.uint32), pos=ns["pos"]),
                             has_gauss=ns["has_gauss"], gauss=ns["gauss"]))
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_ctx(device, amp):
    if amp == "off":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate_split(model, loader, device, amp="off", num_classes=None):
    """(mean loss, accuracy, confusion matrix [true, predicted]) over a loader."""
    model.eval()
    total, loss_sum, correct = 0, torch.zeros((), device=device, dtype=torch.float64), 0
    conf = None
    for x, y in loader:
        with autocast_ctx(device, amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        pred = logits.argmax(1)
        k = num_classes or logits.shape[1]
        c = torch.bincount(y * k + pred, minlength=k * k).reshape(k, k)
        conf = c if conf is None else conf + c
        total += y.numel()
    conf = conf.cpu()
    correct = int(conf.diag().sum())
    return (loss_sum.item() / max(1, total)), correct / max(1, total), conf


def plot_curves(history, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["test_loss"] for h in history], label="test")
    ax[0].set_xlabel("epoch"), ax[0].set_ylabel("loss"), ax[0].set_yscale("log"), ax[0].legend()
    ax[1].plot(ep, [100 * (1 - h["train_acc"]) for h in history], label="train")
    ax[1].plot(ep, [100 * (1 - h["test_acc"]) for h in history], label="test")
    ax[1].set_xlabel("epoch"), ax[1].set_ylabel("error (%)"), ax[1].set_yscale("log"), ax[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def write_metrics(history, out):
    atomic_write_text(json.dumps(history, indent=1), os.path.join(out, "metrics.json"))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    atomic_write_text(buf.getvalue(), os.path.join(out, "metrics.csv"))


# ---- the run --------------------------------------------------------------------------------------------------

def resolve_config(args):
    """The run's recipe: flags over (on --resume) the checkpoint's config over DEFAULTS."""
    ckpt, path = None, None
    if args.resume:
        path = os.path.join(args.out, "last.pt") if args.resume == "auto" else args.resume
        ckpt = load_checkpoint(path)
        base = dict(DEFAULTS)
        base.update({k: v for k, v in ckpt["config"].items() if k in RECIPE_KEYS})
        for k in ("model", "dataset", "shortcut", "batch_size", "seed", "subset", "val_size"):
            given = getattr(args, k, None)
            if given is not None and given != base[k]:
                raise UserError(f"--{k.replace('_', '-')} {given} does not match the checkpoint {path!r} "
                                f"({base[k]}); resume with the same {k.replace('_', ' ')} or start a new --out")
    else:
        base = dict(DEFAULTS)
    cfg = {k: (getattr(args, k) if getattr(args, k, None) is not None else base[k]) for k in RECIPE_KEYS}
    cfg["channels_last"] = bool(args.channels_last or (ckpt and ckpt["config"].get("channels_last")))
    cfg["compile"] = bool(args.compile)
    try:
        parse_model_name(cfg["model"])
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg["dataset"].lower().replace("_", "-") not in DATASETS and cfg["dataset"].lower() not in (
            "fashion-mnist", "emnist"):
        raise UserError(f"unknown dataset {cfg['dataset']!r}; choose from {', '.join(DATASETS)}")
    validate_config(cfg)
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise UserError(f"--stop-after-epoch must be at least 1, got {args.stop_after_epoch}")
    return cfg, ckpt, path if args.resume else None


# flag -> (lowest, highest, whether the lowest itself is allowed); None = unbounded
_RANGES = dict(epochs=(1, None, True), batch_size=(1, None, True), lr=(0.0, None, False), momentum=(0.0, None, True),
               wd=(0.0, None, True), warmup_epochs=(0.0, None, True), label_smoothing=(0.0, 1.0, True),
               max_shift=(0, None, True), val_size=(0, None, True), subset=(0, None, True), seed=(0, 2**31 - 1, True))


def validate_config(cfg):
    """Every recipe value in range and finite, checked before anything is loaded or written (UserError)."""
    for k, (lo, hi, lo_ok) in _RANGES.items():
        v, flag = cfg[k], "--" + k.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{flag} must be a finite number, got {v}")
        if (v < lo if lo_ok else v <= lo) or (hi is not None and v > hi):
            where = (f"at least {lo}" if lo_ok else f"greater than {lo}") + (f" and at most {hi}" if hi else "")
            raise UserError(f"{flag} must be {where}, got {v}")
    if cfg["momentum"] >= 1.0:
        raise UserError(f"--momentum must be below 1 (SGD diverges at 1 and above), got {cfg['momentum']}")
    if cfg["warmup_epochs"] > cfg["epochs"]:
        raise UserError(f"--warmup-epochs {cfg['warmup_epochs']} is longer than the run (--epochs {cfg['epochs']})")


def validate_data(cfg, data, n_train_all):
    """The flags that depend on the dataset's size (checked after loading, before anything is written)."""
    h, w = data["train"].images.shape[-2:]
    if cfg["max_shift"] >= min(h, w):
        raise UserError(f"--max-shift {cfg['max_shift']} must be smaller than the {h}x{w} images")
    if cfg["subset"] > n_train_all:
        raise UserError(f"--subset {cfg['subset']} is more than the {n_train_all} training images of "
                        f"{cfg['dataset']} (0 = all)")


def make_model(cfg, in_channels, num_classes, device):
    kwargs = dict(in_channels=in_channels, num_classes=num_classes)
    if cfg.get("shortcut"):
        kwargs["shortcut"] = cfg["shortcut"]
    try:
        model = build_model(cfg["model"], impl=cfg["impl"], **kwargs)
    except (ValueError, NotImplementedError, RuntimeError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    model = model.to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return model


# the files a run writes in --out (their stale temp files are cleaned at start)
RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "metrics.json", "curves.png")


def check_out_dir(args, resume_path):
    """--out may hold another run's checkpoints only when that run is the one being resumed (or --overwrite)."""
    if args.overwrite:
        return
    same_run = resume_path is not None and os.path.realpath(os.path.dirname(os.path.abspath(resume_path))) == \
        os.path.realpath(args.out)
    if same_run:
        return
    for name in ("last.pt", "best.pt"):
        existing = os.path.join(args.out, name)
        if os.path.exists(existing):
            how = (f"resuming {resume_path!r} would replace it: choose an empty --out, or pass --overwrite"
                   if resume_path else "pass --resume to continue that run, --overwrite to replace it, or choose "
                   "another --out")
            raise UserError(f"{existing} exists: {how}")


def train(argv=None):
    args = build_parser().parse_args(argv)
    cfg, ckpt, resume_path = resolve_config(args)
    check_out_dir(args, resume_path)
    device = pick_device(args.device)
    seed_all(cfg["seed"])
    try:
        data = load_splits(cfg["dataset"], args.data_root, args.download, val_size=cfg["val_size"],
                           subset=cfg["subset"] or None, seed=cfg["seed"], device=device)
    except ValueError as e:  # --val-size out of range for this dataset
        raise UserError(str(e)) from None
    validate_data(cfg, data, data["n_train_all"])
    num_classes = len(data["classes"])
    in_ch = data["train"].images.shape[1]
    model = make_model(cfg, in_ch, num_classes, device)
    cfg.update(in_channels=in_ch, num_classes=num_classes, mean=data["mean"], std=data["std"],
               arch=model.config() if hasattr(model, "config") else None)
    out = check_writable_dir(args.out)  # the first thing written: every check above has passed
    clean_stale_temp_files(out, RUN_FILES)

    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([dict(params=decay, weight_decay=cfg["wd"]), dict(params=no_decay, weight_decay=0.0)],
                          lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["momentum"] > 0)
    loader_kw = dict(mean=data["mean"], std=data["std"], channels_last=cfg["channels_last"])
    train_loader = DeviceLoader(data["train"], cfg["batch_size"], shuffle=True, max_shift=cfg["max_shift"],
                                seed=cfg["seed"], drop_last=len(data["train"]) >= 2 * cfg["batch_size"],
                                **loader_kw)
    test_loader = DeviceLoader(data["test"], 1000, **loader_kw)
    val_loader = DeviceLoader(data["val"], 1000, **loader_kw) if data["val"] is not None else None
    steps = len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")

    start_epoch, history, best = 0, [], -1.0
    if ckpt is not None:
        load_model_state(model, ckpt["model"], f"checkpoint {resume_path!r}")
        try:
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"checkpoint {resume_path!r}: optimizer/scheduler state does not fit this run: {e}") \
                from None
        start_epoch, history, best = ckpt["epoch"], ckpt.get("history", []), ckpt.get("best", -1.0)
        set_rng_state(ckpt["rng"])
        if start_epoch >= cfg["epochs"]:
            print(f"checkpoint is already at epoch {start_epoch} of {cfg['epochs']}: nothing to do "
                  f"(raise --epochs to train further)")
            return history

    run_model = torch.compile(model) if cfg["compile"] else model
    progress = not args.no_progress and sys.stderr.isatty() or os.environ.get("RESNET_FUSED_PROGRESS") == "1"
    # the loss is checked for NaN/Inf at every step where reading it costs nothing (CPU) and every
    # DIVERGENCE_CHECK_STEPS steps elsewhere (a host sync); the error names the first bad step either way
    check_every = 1 if device.type == "cpu" else DIVERGENCE_CHECK_STEPS
    from tqdm import tqdm

    for epoch in range(start_epoch, cfg["epochs"]):
        model.train()
        train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        first_bad = torch.full((), -1, device=device, dtype=torch.int64)  # first step with a non-finite loss
        seen = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not progress, leave=False,
                   dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            with autocast_ctx(device, cfg["amp"]):
                logits = run_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg["label_smoothing"])
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), i, first_bad)
            if (i + 1) % check_every == 0 or i == steps - 1:
                check_divergence(first_bad, epoch, steps, cfg)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += loss.detach() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            if progress and (i % 20 == 0 or i == steps - 1):  # host sync only when the bar is drawn
                el = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}",
                                img_s=f"{seen / el:.0f}")
        train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen
        train_time = time.perf_counter() - t0
        test_loss, test_acc, _ = evaluate_split(run_model, test_loader, device, cfg["amp"], num_classes)
        row = dict(epoch=epoch + 1, lr=opt.param_groups[0]["lr"], train_loss=train_loss, train_acc=train_acc,
                   test_loss=test_loss, test_acc=test_acc, epoch_time_s=train_time,
                   images_per_s=seen / train_time)
        if val_loader is not None:
            row["val_loss"], row["val_acc"], _ = evaluate_split(run_model, val_loader, device, cfg["amp"],
                                                                num_classes)
        history.append(row)
        score = row.get("val_acc", test_acc)
        is_best = score > best
        best = max(best, score)
        state = seal(dict(model=clean_state_dict(model.state_dict()), optimizer=opt.state_dict(),
                          scheduler=sched.state_dict(), scaler=scaler.state_dict(), epoch=epoch + 1, best=best,
                          history=history, rng=rng_state(), config=cfg, torch_version=str(torch.__version__)))
        # checkpoints first, then the metrics that describe them: metrics.csv never shows an epoch that no
        # checkpoint holds
        atomic_save(state, os.path.join(out, "last.pt"))
        if is_best:
            atomic_save(state, os.path.join(out, "best.pt"))
        write_metrics(history, out)
        extra = f" val_acc {row['val_acc']:.4f}" if "val_acc" in row else ""
        print(f"epoch {epoch + 1:3d}/{cfg['epochs']}  loss {train_loss:.4f}  train_acc {train_acc:.4f}  "
              f"test_loss {test_loss:.4f}  test_acc {test_acc:.4f}{extra}  {seen / train_time:,.0f} img/s  "
              f"{train_time:.1f}s", flush=True)
        if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch:
            print(f"stopping after epoch {epoch + 1} as asked; continue with --resume")
            break
    if not args.no_plot and history:
        plot_curves(history, os.path.join(out, "curves.png"), f"{cfg['model']} on {cfg['dataset']}")
    return history


DIVERGENCE_CHECK_STEPS = 20


def check_divergence(first_bad, epoch, steps, cfg):
    """UserError naming the first step whose loss was NaN/Inf (nothing of that epoch has been saved)."""
    bad = int(first_bad)
    if bad >= 0:
        raise UserError(f"training diverged: non-finite loss at epoch {epoch + 1}, step {bad + 1} of {steps} "
                        f"(global step {epoch * steps + bad + 1}); nothing of this epoch was saved. Lower --lr "
                        f"(now {cfg['lr']}) or check the data")


def main(argv=None):
    run_cli(train, argv)


if __name__ == "__main__":
    main()
