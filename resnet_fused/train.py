"""Train a ResNet on an MNIST-family dataset: ``python -m resnet_fused.train --help``.

The whole dataset lives on the device (see resnet_fused.data); the defaults (ResNet-20, SGD momentum 0.9, lr 0.1
with cosine decay after a one-epoch warm-up, weight decay 5e-4, batch 128, +-2 px translations, 15 epochs) reach
about 99.6% MNIST test accuracy without tuning; ``--recipe fast`` (2 epochs) and ``--recipe best`` are named sets
of other defaults (resnet_fused.run_config.RECIPES). Each epoch writes metrics.csv / metrics.json and the checkpoints
last.pt / best.pt (atomically) to --out; --resume continues exactly where a run stopped.

Distributed: ``torchrun --nproc_per_node=N -m resnet_fused.train ...`` (NCCL on GPUs, gloo on CPUs) wraps the model
in DistributedDataParallel; --batch-size is per process (the global batch is N times it), every process holds the
dataset on its device and draws its disjoint part of each global batch (the same batches as one process with the
global batch), metrics are reduced over processes, rank 0 alone prints and writes the checkpoints (loadable by a
single-process run or one of another size). --sync-bn: BatchNorm statistics of the global batch.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
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

from . import distributed as rf_dist
from .checkpoint import (UserError, atomic_save, atomic_write_bytes, atomic_write_text, check_writable_dir,
                         clean_stale_temp_files, clean_state_dict, load_checkpoint, load_model_state, run_cli, seal)
from .data import DATASETS, DeviceLoader, load_splits
from .ema import WeightEMA
from .run_config import DEFAULTS, RECIPE_KEYS, RECIPES, RunConfig  # noqa: F401 - DEFAULTS re-exported
from .zoo import MODEL_NAMES, build_model, parse_model_name

def build_parser():
    # each default is written once, in brackets in its help (the values of the recipe come from DEFAULTS, or from
    # the checkpoint on --resume, so argparse itself holds None for them)
    p = argparse.ArgumentParser(prog="python -m resnet_fused.train", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--recipe", choices=list(RECIPES),
      help="a named set of the defaults below: fast (2 epochs, aiming at 99.5%% on MNIST), best (aiming at the "
           "best single-model accuracy: 99.77%% on MNIST with ResNet-32, mean of 3 seeds, docs/RESULTS.md); flags "
           "given override it [default]")
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
    a("--max-shift", type=int, help="random translation in pixels, 0 = none [2]")
    a("--rotate", type=float, help="random rotation in degrees, +- this, 0 = none [0]")
    a("--scale", type=float, help="random zoom, 1 +- this, 0 = none [0]")
    a("--elastic", type=float, help="elastic distortion: the scale (pixels) of a random displacement field "
                                    "smoothed over 4 px, 0 = none [0]")
    a("--erase", type=float, help="random erasing: the probability that an image gets one random rectangle "
                                  "(2-40%% of its area) set to the background, 0 = none [0]")
    a("--ema", type=float, help="decay of an exponential moving average of the weights (BatchNorm statistics "
                                "too), evaluated and saved besides the trained weights; 0 = off [0]")
    a("--val-size", type=int, help="images carved from train for validation; best.pt then follows val [0]")
    a("--subset", type=int, help="use only the first N training (and test) images, 0 = all [0]")
    a("--amp", choices=["off", "bf16", "fp16"], help="autocast dtype [off]")
    a("--channels-last", action="store_true", help="channels_last memory format")
    a("--sync-bn", action="store_const", const=True,
      help="under torchrun: BatchNorm statistics over the global batch (FusedResNet's fused sync; "
           "torch.nn.SyncBatchNorm for --impl reference, CUDA only) [off]")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--seed", type=int, help="[0]")
    a("--init-noise", type=float,
      help="multiply every initial weight by 1 + this x N(0, 1) (its own generator: the data order and the rest of "
           "the run are unchanged); a control for parity runs: how far a run drifts from a 1e-6 change [0]")
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
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch) if cfg.schedule != "onecycle" else 0
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "multistep":
        e = step / steps_per_epoch
        return 0.1 ** sum(e >= m * cfg.epochs for m in (0.5, 0.75))
    if cfg.schedule == "cosine":
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
def evaluate_split(model, loader, device, amp="off", num_classes=None, reduce=False):
    """(mean loss, accuracy, confusion matrix [true, predicted]) over a loader; ``reduce``: summed over the
    processes of the distributed run, each holding a shard of the split."""
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
    if reduce:
        packed = torch.cat([loss_sum.reshape(1), conf.flatten().double()])  # one collective (counts exact in fp64)
        torch.distributed.all_reduce(packed)
        loss_sum, conf = packed[0], packed[1:].round().long().reshape(conf.shape)
        total = int(conf.sum())
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
    """(RunConfig, checkpoint or None, its path or None): flags over (on --resume) the checkpoint's settings over
    the recipe's."""
    ckpt, path = None, None
    name = args.recipe or "default"
    base = RECIPES[name]
    if args.resume:
        path = os.path.join(args.out, "last.pt") if args.resume == "auto" else args.resume
        ckpt = load_checkpoint(path)
        had = ckpt["config"].get("recipe", "default")
        if args.recipe is not None and args.recipe != had:
            raise UserError(f"--recipe {args.recipe} does not match the checkpoint {path!r} ({had}); resume with "
                            f"the same recipe or start a new --out")
        base = RunConfig.from_saved({k: v for k, v in ckpt["config"].items() if k in RECIPE_KEYS},
                                    dataclasses.replace(RECIPES.get(had, DEFAULTS), recipe=had))
        for k in ("model", "dataset", "shortcut", "batch_size", "seed", "subset", "val_size"):
            given = getattr(args, k, None)
            if given is not None and given != getattr(base, k):
                raise UserError(f"--{k.replace('_', '-')} {given} does not match the checkpoint {path!r} "
                                f"({getattr(base, k)}); resume with the same {k.replace('_', ' ')} or start a new "
                                f"--out")
    given = {k: getattr(args, k) for k in RECIPE_KEYS if getattr(args, k, None) is not None}
    cfg = dataclasses.replace(base, **given, compile=bool(args.compile),
                              channels_last=bool(args.channels_last or (ckpt and ckpt["config"].get("channels_last"))))
    try:
        parse_model_name(cfg.model)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.dataset.lower().replace("_", "-") not in DATASETS and cfg.dataset.lower() not in (
            "fashion-mnist", "emnist"):
        raise UserError(f"unknown dataset {cfg.dataset!r}; choose from {', '.join(DATASETS)}")
    cfg.validate()
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise UserError(f"--stop-after-epoch must be at least 1, got {args.stop_after_epoch}")
    return cfg, ckpt, path if args.resume else None


def validate_data(cfg, data, n_train_all):
    """The flags that depend on the dataset's size (checked after loading, before anything is written)."""
    h, w = data["train"].images.shape[-2:]
    if cfg.max_shift >= min(h, w):
        raise UserError(f"--max-shift {cfg.max_shift} must be smaller than the {h}x{w} images")
    if cfg.subset > n_train_all:
        raise UserError(f"--subset {cfg.subset} is more than the {n_train_all} training images of "
                        f"{cfg.dataset} (0 = all)")


def make_model(cfg, in_channels, num_classes, device):
    """The run's model (a RunConfig, or a checkpoint's saved settings) on ``device``, in its memory format."""
    if isinstance(cfg, dict):
        cfg = RunConfig.from_saved(cfg)
    kwargs = dict(in_channels=in_channels, num_classes=num_classes)
    if cfg.shortcut:
        kwargs["shortcut"] = cfg.shortcut
    try:
        model = build_model(cfg.model, impl=cfg.impl, **kwargs)
    except (ValueError, NotImplementedError, RuntimeError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    if cfg.init_noise:
        perturb_weights(model, cfg.init_noise, cfg.seed)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def perturb_weights(model, eps, seed):
    """Every parameter times 1 + eps * N(0, 1), drawn from a generator of its own (the global RNG, hence the data
    order and the augmentations, are untouched)."""
    g = torch.Generator().manual_seed(1234 + seed)
    for p in model.parameters():
        p.add_((p.double() * eps * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype))


def make_optimizer(model, cfg):
    """SGD (Nesterov momentum) of the recipe; no weight decay on BatchNorm parameters and biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([dict(params=decay, weight_decay=cfg.wd), dict(params=no_decay, weight_decay=0.0)],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def make_train_loader(data, cfg, global_batch, shard=(0, 1)):
    """The recipe's shuffled, augmented training batches (the last, smaller one dropped where the split holds at
    least two batches, and always in a distributed run)."""
    world = shard[1]
    return DeviceLoader(data["train"], global_batch, data["mean"], data["std"], shuffle=True,
                        max_shift=cfg.max_shift, rotate=cfg.rotate, scale=cfg.scale, erase=cfg.erase,
                        elastic=cfg.elastic, seed=cfg.seed,
                        drop_last=world > 1 or len(data["train"]) >= 2 * global_batch,
                        channels_last=cfg.channels_last, shard=shard)


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


def setup_distributed(args, device):
    """(DistEnv, device) for this process: torchrun's launch joined (NCCL on CUDA, gloo on CPU) and the device of
    this rank, or a single-process DistEnv when the variables are absent. UserError for a bad launch."""
    try:
        denv = rf_dist.env_from_torchrun()
    except ValueError as e:
        raise UserError(str(e)) from None
    if denv is None:
        return rf_dist.DistEnv(), device
    if device.type == "cuda":
        if denv.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={denv.local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s): launch at most that many processes per node")
        device = torch.device("cuda", denv.local_rank)
        torch.cuda.set_device(device)
    import datetime
    import torch.distributed as dist
    timeout = float(os.environ.get("RESNET_FUSED_DIST_TIMEOUT", "300"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        dist.barrier()  # every rank present, or an error within the timeout
    except Exception as e:  # noqa: BLE001 - a store/connection/timeout error of any kind: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"rank {denv.rank} of WORLD_SIZE={denv.world_size} could not join the run at "
                        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout:g} s ({backend}): "
                        f"{first}") from None
    return denv, device


def shard_split(split, denv):
    """This rank's contiguous part of an evaluation split (at least one image per rank)."""
    if not denv.enabled:
        return split
    lo, hi = rf_dist.shard_bounds(len(split), denv.rank, denv.world_size)
    return split.subset(slice(lo, hi))


def train(argv=None):
    args = build_parser().parse_args(argv)
    cfg, ckpt, resume_path = resolve_config(args)
    check_out_dir(args, resume_path)
    denv, device = setup_distributed(args, pick_device(args.device))
    try:
        return _train(args, cfg, ckpt, resume_path, denv, device)
    finally:
        if denv.enabled or torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclasses.dataclass
class _Run:
    """What the steps of one training run share: the settings, the model and its optimizer, the loaders, and where
    the run stands (epoch, history, best score)."""
    args: argparse.Namespace
    cfg: RunConfig
    denv: object
    device: torch.device
    model: torch.nn.Module
    out: str
    # what the data and the model add to the settings (channels, classes, normalization, architecture): saved in
    # the checkpoint's config beside cfg, for evaluate.py and a resumed run
    facts: dict = dataclasses.field(default_factory=dict)
    opt: torch.optim.Optimizer = None
    sched: object = None
    scaler: object = None
    ema: object = None
    train_loader: object = None
    test_loader: object = None
    val_loader: object = None
    run_model: torch.nn.Module = None  # the model as the steps call it: under DDP and/or torch.compile
    start_epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    best: float = -1.0

    @property
    def main(self):
        return self.denv.is_main

    @property
    def world(self):
        return self.denv.world_size

    @property
    def global_batch(self):
        return self.cfg.batch_size * self.world

    def saved_config(self) -> dict:
        """The checkpoint's ``config``: the settings, the data's facts, the number of processes."""
        return dict(self.cfg.as_dict(), **self.facts, world_size=self.world, global_batch=self.global_batch)


def _train(args, cfg, ckpt, resume_path, denv, device):
    """Set up, restore, then per epoch: train, evaluate, save (each step a function below)."""
    run = _set_up(args, cfg, denv, device)
    if ckpt is not None and not _restore(run, ckpt, resume_path):
        return run.history
    _wrap_model(run)
    if run.main and run.world > 1:
        print(f"distributed: {run.world} processes ({torch.distributed.get_backend()}), batch {cfg.batch_size} "
              f"per process, global batch {run.global_batch}{', sync-BN' if cfg.sync_bn else ''}", flush=True)
    for epoch in range(run.start_epoch, cfg.epochs):
        row = _evaluate_epoch(run, _train_epoch(run, epoch))
        _save_epoch(run, row)
        if run.world > 1:
            torch.distributed.barrier()  # the epoch ends for everyone once its checkpoint is on disk
        if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch:
            if run.main:
                print(f"stopping after epoch {epoch + 1} as asked; continue with --resume")
            break
    if run.main and not args.no_plot and run.history:
        plot_curves(run.history, os.path.join(run.out, "curves.png"), f"{cfg.model} on {cfg.dataset}")
    return run.history


def _load_data(args, cfg, denv, device):
    """The dataset's splits on the device, checked against the settings and the number of processes."""
    world = denv.world_size
    try:
        data = load_splits(cfg.dataset, args.data_root, args.download and denv.is_main, val_size=cfg.val_size,
                           subset=cfg.subset or None, seed=cfg.seed, device=device)
    except ValueError as e:  # --val-size out of range for this dataset
        raise UserError(str(e)) from None
    validate_data(cfg, data, data["n_train_all"])
    global_batch = cfg.batch_size * world
    if world > 1:  # every rank needs data (a rank without any would leave the others waiting in a collective)
        needs = (("training", data["train"], global_batch,
                  f"one global batch (--batch-size {cfg.batch_size} x {world} processes)"),
                 ("test", data["test"], world, f"one per process ({world})"),
                 ("validation", data["val"], world, f"one per process ({world})"))
        for name, split, need, what in needs:
            if split is not None and len(split) < need:
                raise UserError(f"the {name} split has {len(split)} images, fewer than {what}: use fewer "
                                f"processes, a smaller --batch-size or more data")
    return data


def _build_model(cfg, data, denv, device):
    """The model for the data's channels and classes, with synchronized BatchNorm where asked."""
    model = make_model(cfg, data["train"].images.shape[1], len(data["classes"]), device)
    if cfg.sync_bn:
        if cfg.impl == "fused":
            model.sync_bn = True
        elif device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif denv.world_size > 1:
            raise UserError("--sync-bn with --impl reference needs CUDA (torch.nn.SyncBatchNorm runs on GPUs "
                            "only); use --impl fused for synchronized BatchNorm on CPUs")
    return model


def _set_up(args, cfg, denv, device):
    """Data, model, output folder, optimizer, schedule, loaders and EMA of a new run (nothing restored yet)."""
    seed_all(cfg.seed)
    data = _load_data(args, cfg, denv, device)
    model = _build_model(cfg, data, denv, device)
    world = denv.world_size
    facts = dict(in_channels=data["train"].images.shape[1], num_classes=len(data["classes"]), mean=data["mean"],
                 std=data["std"], arch=model.config() if hasattr(model, "config") else None)
    out = args.out
    if denv.is_main:
        out = check_writable_dir(args.out)  # the first thing written: every check above has passed
        clean_stale_temp_files(out, RUN_FILES)
    run = _Run(args, cfg, denv, device, model, out, facts)
    run.opt = make_optimizer(model, cfg)
    loader_kw = dict(mean=data["mean"], std=data["std"], channels_last=cfg.channels_last)
    run.train_loader = make_train_loader(data, cfg, run.global_batch, shard=(denv.rank, world))
    run.test_loader = DeviceLoader(shard_split(data["test"], denv), 1000, **loader_kw)
    if data["val"] is not None:
        run.val_loader = DeviceLoader(shard_split(data["val"], denv), 1000, **loader_kw)
    steps = len(run.train_loader)
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lambda s: lr_factor(s, steps, cfg))
    run.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    run.ema = WeightEMA(model, cfg.ema) if cfg.ema > 0 else None
    return run


def _restore(run, ckpt, resume_path) -> bool:
    """The run's state from its checkpoint; False when the checkpoint already holds every epoch asked for."""
    cfg, where = run.cfg, f"checkpoint {resume_path!r}"
    load_model_state(run.model, ckpt["model"], where)
    if run.ema is not None:
        if "ema" not in ckpt:
            raise UserError(f"{where} has no weight EMA but this run asks for --ema {cfg.ema}: resume with its "
                            f"own settings or start a new --out")
        load_model_state(run.ema.model, ckpt["ema"]["model"], f"{where} (EMA)")
        run.ema.updates = int(ckpt["ema"]["updates"])
    try:
        run.opt.load_state_dict(ckpt["optimizer"])
        run.sched.load_state_dict(ckpt["scheduler"])
        run.scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{where}: optimizer/scheduler state does not fit this run: {e}") from None
    run.start_epoch, run.history, run.best = ckpt["epoch"], ckpt.get("history", []), ckpt.get("best", -1.0)
    set_rng_state(ckpt["rng"])
    # the schedule's position from the epoch (steps per epoch change with the number of processes)
    run.sched.last_epoch = run.start_epoch * len(run.train_loader) - 1
    run.sched.step()
    before = ckpt["config"].get("world_size", 1)
    if before != run.world and run.main:
        print(f"resuming a run of {before} process(es) with {run.world}: the global batch is now "
              f"{run.global_batch}")
    if run.start_epoch >= cfg.epochs:
        if run.main:
            print(f"checkpoint is already at epoch {run.start_epoch} of {cfg.epochs}: nothing to do (raise "
                  f"--epochs to train further)")
        return False
    return True


def _wrap_model(run):
    """run.run_model: the model under DDP (several processes) and torch.compile (--compile)."""
    run.run_model = run.model
    if run.world > 1:
        # the 1-input-channel stem's weight gradient comes back from a channels_last convolution with a different
        # (equivalent: the dimension has size 1) stride; DDP warns about it on every run
        import warnings
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        run.run_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.cfg.compile:
        run.run_model = torch.compile(run.run_model)


def _train_epoch(run, epoch) -> dict:
    """One epoch of training steps; its training metrics (loss and accuracy over every process, time, speed)."""
    cfg, device, steps = run.cfg, run.device, len(run.train_loader)
    progress = run.main and (not run.args.no_progress and sys.stderr.isatty()
                             or os.environ.get("RESNET_FUSED_PROGRESS") == "1")
    # the loss is checked for NaN/Inf at every step where reading it costs nothing (CPU) and every
    # DIVERGENCE_CHECK_STEPS steps elsewhere (a host sync); the error names the first bad step either way
    check_every = 1 if device.type == "cpu" else DIVERGENCE_CHECK_STEPS
    from tqdm import tqdm
    run.model.train()
    run.train_loader.set_epoch(epoch)
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    first_bad = torch.full((), -1, device=device, dtype=torch.int64)  # first step with a non-finite loss
    seen = 0
    bar = tqdm(run.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False,
               dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        with autocast_ctx(device, cfg.amp):
            logits = run.run_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), i, first_bad)
        if (i + 1) % check_every == 0 or i == steps - 1:
            check_divergence(first_bad, epoch, steps, cfg, run.denv)
        run.opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
        run.sched.step()
        if run.ema is not None:
            run.ema.update(run.model)
        loss_sum += loss.detach().double() * y.numel()
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.numel()
        if progress and (i % 20 == 0 or i == steps - 1):  # host sync only when the bar is drawn
            el = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}",
                            img_s=f"{seen * run.world / el:.0f}")
    if run.world > 1:  # one collective: the epoch's sums over every process
        packed = torch.stack([loss_sum, correct, torch.tensor(float(seen), dtype=torch.float64, device=device)])
        torch.distributed.all_reduce(packed)
        loss_sum, correct, seen = packed[0], packed[1], int(packed[2].item())
    train_time = time.perf_counter() - t0
    return dict(epoch=epoch + 1, lr=run.opt.param_groups[0]["lr"], train_loss=loss_sum.item() / seen,
                train_acc=correct.item() / seen, epoch_time_s=train_time, images_per_s=seen / train_time)


def _evaluate_epoch(run, trained) -> dict:
    """The epoch's row of metrics: its training metrics and the test (and validation) loss and accuracy. With --ema
    the averaged weights are the run's result: the test/val columns are theirs (the trained weights' test accuracy
    besides, as test_acc_raw)."""
    cfg, classes, reduce = run.cfg, run.facts["num_classes"], run.world > 1
    judged = run.ema.model if run.ema is not None else run.run_model
    test_loss, test_acc, _ = evaluate_split(judged, run.test_loader, run.device, cfg.amp, classes, reduce=reduce)
    row = {k: trained[k] for k in ("epoch", "lr", "train_loss", "train_acc")}  # the columns in their usual order
    row.update(test_loss=test_loss, test_acc=test_acc, epoch_time_s=trained["epoch_time_s"],
               images_per_s=trained["images_per_s"])
    if run.ema is not None:
        row["test_acc_raw"] = evaluate_split(run.run_model, run.test_loader, run.device, cfg.amp, classes,
                                             reduce=reduce)[1]
    if run.val_loader is not None:
        row["val_loss"], row["val_acc"], _ = evaluate_split(judged, run.val_loader, run.device, cfg.amp, classes,
                                                            reduce=reduce)
    return row


def _save_epoch(run, row):
    """The epoch in the history; on the main process last.pt (and best.pt), then the metrics that describe them."""
    run.history.append(row)
    score = row.get("val_acc", row["test_acc"])
    is_best = score > run.best
    run.best = max(run.best, score)
    if not run.main:
        return
    ema = run.ema
    state = seal(dict(model=clean_state_dict(run.model.state_dict()), optimizer=run.opt.state_dict(),
                      scheduler=run.sched.state_dict(), scaler=run.scaler.state_dict(), epoch=row["epoch"],
                      best=run.best, history=run.history, rng=rng_state(), config=run.saved_config(),
                      torch_version=str(torch.__version__),
                      **(dict(ema=dict(model=clean_state_dict(ema.model.state_dict()), updates=ema.updates))
                         if ema is not None else {})))
    # checkpoints first, then the metrics that describe them: metrics.csv never shows an epoch that no checkpoint
    # holds
    atomic_save(state, os.path.join(run.out, "last.pt"))
    if is_best:
        atomic_save(state, os.path.join(run.out, "best.pt"))
    write_metrics(run.history, run.out)
    extra = f" val_acc {row['val_acc']:.4f}" if "val_acc" in row else ""
    extra += f" (EMA; trained weights {row['test_acc_raw']:.4f})" if ema is not None else ""
    print(f"epoch {row['epoch']:3d}/{run.cfg.epochs}  loss {row['train_loss']:.4f}  train_acc "
          f"{row['train_acc']:.4f}  test_loss {row['test_loss']:.4f}  test_acc {row['test_acc']:.4f}{extra}  "
          f"{row['images_per_s']:,.0f} img/s  {row['epoch_time_s']:.1f}s", flush=True)


DIVERGENCE_CHECK_STEPS = 20


def check_divergence(first_bad, epoch, steps, cfg, denv=None):
    """UserError naming the first step whose loss was NaN/Inf (nothing of that epoch has been saved); in a
    distributed run the earliest over all processes, so that every rank stops at the same step."""
    if denv is not None and denv.enabled:
        big = torch.iinfo(torch.int64).max
        first_bad = torch.where(first_bad < 0, big, first_bad)
        torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
        first_bad = torch.where(first_bad == big, -1, first_bad)
    bad = int(first_bad)
    if bad >= 0:
        raise UserError(f"training diverged: non-finite loss at epoch {epoch + 1}, step {bad + 1} of {steps} "
                        f"(global step {epoch * steps + bad + 1}); nothing of this epoch was saved. Lower --lr "
                        f"(now {cfg.lr}) or check the data")


def main(argv=None):
    run_cli(train, argv)


if __name__ == "__main__":
    main()
