"""The settings of one training run: a frozen ``RunConfig``, its defaults and the named recipes.

``python -m resnet_fused.train`` resolves one from the flags (over the recipe, over the checkpoint's saved
settings on --resume); the experiments and bench/time_to_accuracy.py start from ``RECIPES[name]`` and change fields
with ``dataclasses.replace``. A checkpoint saves ``as_dict()`` (with the data's channels, classes and statistics
beside it); ``RunConfig.from_saved`` reads that dict back, older checkpoints included (a field they lack keeps its
default, keys that are not settings are ignored).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .checkpoint import UserError


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # the recipe: on --resume these come from the checkpoint unless given again (and must then agree)
    model: str = "resnet20"
    impl: str = "fused"
    dataset: str = "mnist"
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    wd: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    amp: str = "off"
    max_shift: int = 2
    rotate: float = 0.0
    scale: float = 0.0
    elastic: float = 0.0
    erase: float = 0.0
    ema: float = 0.0
    val_size: int = 0
    subset: int = 0
    seed: int = 0
    shortcut: Optional[str] = None
    sync_bn: bool = False
    init_noise: float = 0.0
    # how it runs: the recipe's name, the memory format, torch.compile
    recipe: str = "default"
    channels_last: bool = False
    compile: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, saved: dict, base: "RunConfig | None" = None) -> "RunConfig":
        """A checkpoint's saved settings over ``base`` (the defaults): missing fields keep base's value, keys
        that are not settings (the data's channels, classes, statistics) are ignored."""
        return dataclasses.replace(base or cls(), **{k: v for k, v in saved.items() if k in FIELDS})

    def validate(self) -> "RunConfig":
        """Every value in range and finite, checked before anything is loaded or written (UserError)."""
        for k, (lo, hi, lo_ok) in _RANGES.items():
            v, flag = getattr(self, k), "--" + k.replace("_", "-")
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{flag} must be a finite number, got {v}")
            if (v < lo if lo_ok else v <= lo) or (hi is not None and v > hi):
                where = (f"at least {lo}" if lo_ok else f"greater than {lo}") + (f" and at most {hi}" if hi else "")
                raise UserError(f"{flag} must be {where}, got {v}")
        for k, bound, why in _BELOW:
            if getattr(self, k) >= bound:
                raise UserError(f"--{k} must be below {bound:g} ({why}), got {getattr(self, k)}")
        if self.warmup_epochs > self.epochs:
            raise UserError(f"--warmup-epochs {self.warmup_epochs} is longer than the run (--epochs {self.epochs})")
        return self


FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))
# the fields a recipe sets and a flag overrides (the rest say how a run is carried out)
RECIPE_KEYS = FIELDS[:FIELDS.index("recipe")]

# flag -> (lowest, highest, whether the lowest itself is allowed); None = unbounded
_RANGES = dict(epochs=(1, None, True), batch_size=(1, None, True), lr=(0.0, None, False), momentum=(0.0, None, True),
               wd=(0.0, None, True), warmup_epochs=(0.0, None, True), label_smoothing=(0.0, 1.0, True),
               max_shift=(0, None, True), rotate=(0.0, 180.0, True), scale=(0.0, None, True),
               erase=(0.0, 1.0, True), elastic=(0.0, None, True),
               ema=(0.0, None, True), val_size=(0, None, True), subset=(0, None, True), seed=(0, 2**31 - 1, True),
               init_noise=(0.0, 1.0, True))
# flag, the bound it must stay below, and why
_BELOW = (("momentum", 1.0, "SGD diverges at 1 and above"),
          ("scale", 1.0, "a zoom of 1 - scale must stay positive"),
          ("ema", 1.0, "0 = off; 0.999 averages over about 1000 steps"))

DEFAULTS = RunConfig()
# --recipe NAME: the defaults it changes (flags given on the command line override them). How each was chosen, with
# the measurements: docs/RESULTS.md "Accuracy" and results/recipes/.
RECIPES = dict(
    default=DEFAULTS,
    # the fewest images to 99.5% MNIST test accuracy: 3 of 3 seeds in 2 epochs (docs/RESULTS.md "Accuracy"; lr 0.4
    # at batch 256 spiked near the one-cycle peak, in the reference as in the fused runs: results/recipes/README.md)
    fast=dataclasses.replace(DEFAULTS, recipe="fast", epochs=2, batch_size=128, schedule="onecycle", lr=0.2,
                             label_smoothing=0.1),
    # the best single-model accuracy: small rotations/zooms on top of the shifts, label smoothing, weight EMA,
    # a longer schedule, ResNet-32 (99.77% over 3 seeds against ResNet-20's 99.73%: results/best-resnet32/)
    best=dataclasses.replace(DEFAULTS, recipe="best", model="resnet32", epochs=40, rotate=10.0, scale=0.1,
                             label_smoothing=0.1, ema=0.999),
)


def recipe(name: str, **changes) -> RunConfig:
    """RECIPES[name] with ``changes`` (None values ignored: an option not given), validated."""
    return dataclasses.replace(RECIPES[name], **{k: v for k, v in changes.items() if v is not None}).validate()
