"""Typed, frozen settings for one run.

Every setting the engine reads lives here, so library code takes a Config
instead of reading absl FLAGS, and every invalid value is caught before any
TensorFlow work starts, with a message that names the flag a user typed.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Tuple

BACKBONES = ("inceptionv3", "resnet50", "mobilenetv2", "efficientnetb0", "tiny_cnn")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "cosine", "step")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")
MODES = ("train", "eval", "benchmark", "export")
# --threshold_objective: what the per-label threshold search maximises (engine/metrics.py).
THRESHOLD_OBJECTIVES = ("samples", "per_label")
TASKS = ("multilabel", "multiclass", "segmentation")
SEG_MODELS = ("unet", "deeplabv3plus")  # --task=segmentation (models/segmentation.py)
BENCHMARK_INPUTS = ("synthetic", "real", "both")
# --benchmark_compare: a comma list of these (engine/benchmark.py runs them side by side).
BENCHMARK_COMPARES = ("none", "keras_fit", "ema", "frozen", "mirrored1", "k1")
# --mixed_precision: Keras mixed policies; float16 adds dynamic loss scaling (precision.py).
MIXED_PRECISIONS = ("float32", "bfloat16", "float16")
# The embedded images are 64x64, so larger inputs only cost time; InceptionV3
# cannot go below 75.
DEFAULT_INPUT_SIZE = {"inceptionv3": 75, "resnet50": 64, "mobilenetv2": 64,
                      "efficientnetb0": 64, "tiny_cnn": 32}
# --allow_changed: settings whose change on resume changes what the saved
# state means (engine/manifest.py says what opting in does for each).
ALLOWABLE_CHANGES = ("optimizer", "labels", "task", "input_size", "batch_size")
# --calibrate_bn_steps=-1 (auto) with a random init, in batches of --batch_size:
# 64 x 32 is one pass over the embedded training split; the statistics are
# then within ~1% of a 256-batch estimate, and the README run's frozen phase
# reached val macro AUC 0.65-0.68 for 8-128 batches against 0.53 without
# (BUILD_NOTES.md, "BN calibration").
AUTO_CALIBRATE_BN_STEPS = 64
_UNFREEZE_LAYERS = re.compile(r"^(all|blocks:[1-9][0-9]*|regex:.+)$")


class ConfigError(ValueError):
    """A setting a user can fix; the message is one line naming the flag."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    backbone: str = "tiny_cnn"
    input_size: int = 32
    weights: Optional[str] = None  # None, "imagenet" or a local weights file
    dropout: float = 0.0
    task: str = "multilabel"
    # With several replicas, unsynchronized BN keeps one set of moving
    # statistics per replica (Keras creates them with aggregation "none"), and
    # checkpoints/eval silently use replica 0's. So sync is the default.
    sync_bn: bool = True
    # Momentum of every BatchNorm's moving statistics; None keeps the
    # architecture's own (0.99 for keras.applications).
    bn_momentum: Optional[float] = 0.9
    # --task=segmentation only: the model (it brings its own encoder; --backbone
    # is not used) and the U-Net's size.
    seg_model: str = "unet"
    unet_depth: int = 4  # poolings; --input_size must be a multiple of 2^depth
    unet_filters: int = 16  # channels of the first level, doubled at each


@dataclasses.dataclass(frozen=True)
class DataConfig:
    data_dir: Optional[str] = None  # None: the embedded dataset
    cache_dir: str = "~/.cache/tapeworks"
    augment: bool = True
    # Find undecodable images, bad label vectors, wrong-size images, corrupt
    # TFRecord records and CSV rows naming no file when the data is opened,
    # and train without them (counted in the epoch report) instead of failing.
    skip_bad_records: bool = False
    # Decode the training split once and keep it in memory when it takes at
    # most this many MB as float32 pixels (0: decode every epoch).
    decoded_cache_mb: int = 1024


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"
    learning_rate: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_step_epochs: Tuple[int, ...] = ()
    lr_step_factor: float = 0.1
    backbone_lr_multiplier: float = 1.0
    # With --unfreeze_at, the schedule (warmup, constant or cosine decay)
    # starts again from the peak when the backbone thaws (engine/optimizer.py).
    restart_at_unfreeze: bool = True
    global_clipnorm: float = 0.0  # 0: off
    # Also applied to the replica-summed gradients, in the order
    # clipvalue -> clipnorm (per variable) -> global_clipnorm; 0: off.
    clipnorm: float = 0.0
    clipvalue: float = 0.0


@dataclasses.dataclass(frozen=True)
class FreezeConfig:
    unfreeze_at: int = 0  # frozen for the first N epochs
    unfreeze_layers: str = "all"  # all | blocks:K | regex:PATTERN
    freeze_bn: bool = False


@dataclasses.dataclass(frozen=True)
class LossConfig:
    loss: str = "bce"
    pos_weight: Optional[str] = None  # None | "auto" | "w1,w2,..."
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    fbeta: float = 2.0
    fbeta_weight: float = 0.5
    label_smoothing: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model_dir: str = "runs/default"
    # The README run (--unfreeze_at=5): 5 frozen epochs, then 7 of fine-tuning,
    # which a random-init backbone needs (BUILD_NOTES.md, "The README run's recipe").
    epochs: int = 12
    batch_size: int = 32  # global, over all replicas and workers
    steps_per_epoch: int = 0  # 0: the whole training split
    steps_per_loop: int = 10
    seed: int = 0
    deterministic: bool = False
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    keep_checkpoints: int = 3
    best_metric: str = "val_loss"
    best_mode: str = "min"
    strategy: str = "default"
    num_virtual_cpus: int = 0
    progress: bool = True
    init_checkpoint: Optional[str] = None  # warm start when model_dir has no checkpoint
    init_include: Tuple[str, ...] = ()
    init_exclude: Tuple[str, ...] = ()
    allow_partial_restore: bool = False
    # Flags whose change on resume is accepted although it changes what the
    # saved state means (engine/manifest.py STATE); that state starts fresh.
    allow_changed: Tuple[str, ...] = ()
    ema_decay: float = 0.0  # 0: off
    ema_warmup: bool = True
    eval_with_ema: bool = True
    # BatchNorm statistics re-estimated once, at the start of a fresh run,
    # from this many training batches (forward passes in training mode, no
    # weight update; engine/calibration.py): -1 is auto (AUTO_CALIBRATE_BN_STEPS
    # for a random init, 0 when --weights or --init_checkpoint load weights,
    # whose statistics already fit them), 0 is off.
    calibrate_bn_steps: int = -1
    # Re-estimate the statistics for the EMA weights before their evaluation
    # and export (averaged weights never ran with the averaged statistics).
    ema_calibrate_bn: bool = False
    export_raw: bool = False  # --mode=export: the raw weights even when EMA is on
    # --mode=export: "best" (model_dir/best/, picked by --best_metric; the latest
    # when best/ is empty), "latest" (model_dir/checkpoints/) or a checkpoint prefix.
    export_from: str = "best"
    # Per-label thresholds maximise each label's own F-beta ("per_label") or the
    # mean per-image F-beta ("samples"); see engine/metrics.py and BUILD_NOTES.
    threshold_objective: str = "per_label"
    # Non-finite guard (engine/health.py): a step whose loss or gradients are
    # not finite changes nothing and is counted; after max_bad_steps in a row
    # (0: never) the last good checkpoint is restored and the learning rate
    # multiplied by bad_step_lr_factor; after max_rollbacks the run stops.
    max_bad_steps: int = 5
    max_rollbacks: int = 3
    bad_step_lr_factor: float = 0.5
    # A finite but absurd loss is divergence too: a train call's mean loss or
    # the val loss above this many times the prevalence baseline's val loss
    # is handled like max_bad_steps (rollback, then a diagnosis; 0: off).
    max_loss_ratio: float = 1000.0
    # In-graph TensorBoard summaries (0: off): scalars (lr, gradient norms,
    # loss), weight/gradient histograms, input images with predictions.
    summary_every: int = 10
    histogram_every: int = 0
    image_every: int = 0
    # Epoch callbacks on --best_metric/--best_mode (0: off).
    early_stop_patience: int = 0
    plateau_patience: int = 0
    plateau_factor: float = 0.1
    # Only --mode=benchmark honours these two so far (engine/benchmark.py sets
    # the Keras policy; XLA needs a hook in engine/steps.py, see there).
    mixed_precision: str = "float32"  # float32 | bfloat16 | float16 (loss-scaled; precision.py)
    jit_compile: bool = False  # XLA for the train step; slower on CPU (DESIGN.md)


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """--mode=benchmark only: timed windows of the train step (engine/benchmark.py)."""
    window_s: float = 2.0  # each timed window lasts at least this long
    windows: int = 5
    input: str = "synthetic"  # synthetic | real | both
    compare: str = "none"  # none, or a comma list of keras_fit, ema, frozen, mirrored1, k1

    def compares(self) -> Tuple[str, ...]:
        """--benchmark_compare as a tuple of names (empty for none)."""
        names = tuple(n.strip() for n in self.compare.split(",") if n.strip())
        return () if names == ("none",) else names


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    freeze: FreezeConfig = FreezeConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()

    def replace(self, **groups) -> "Config":
        """Returns a copy with some fields of some groups changed.

        Example: config.replace(train={"epochs": 2}, model={"backbone": "tiny_cnn"}).
        """
        changes = {name: dataclasses.replace(getattr(self, name), **fields)
                   for name, fields in groups.items()}
        return dataclasses.replace(self, **changes).validated()

    def bn_calibration_steps(self) -> int:
        """--calibrate_bn_steps resolved: auto (-1) calibrates a random init only."""
        steps = self.train.calibrate_bn_steps
        if steps >= 0:
            return steps
        loaded = self.model.weights is not None or self.train.init_checkpoint is not None
        return 0 if loaded else AUTO_CALIBRATE_BN_STEPS

    def ema_calibration_steps(self) -> int:
        """Batches for --ema_calibrate_bn: --calibrate_bn_steps when > 0, else the auto number."""
        steps = self.train.calibrate_bn_steps
        return steps if steps > 0 else AUTO_CALIBRATE_BN_STEPS

    def validated(self) -> "Config":
        """Returns self, or raises ConfigError naming the first bad flag."""
        m, o, f, t = self.model, self.optimizer, self.freeze, self.train
        _one_of("backbone", m.backbone, BACKBONES)
        _one_of("task", m.task, TASKS)
        _one_of("optimizer", o.name, OPTIMIZERS)
        _at_least("decoded_cache_mb", self.data.decoded_cache_mb, 0)
        _one_of("lr_schedule", o.schedule, SCHEDULES)
        _one_of("strategy", t.strategy, STRATEGIES)
        _one_of("best_mode", t.best_mode, ("min", "max"))
        _one_of("threshold_objective", t.threshold_objective, THRESHOLD_OBJECTIVES)
        if not t.export_from.strip():
            raise ConfigError("--export_from is empty: give best, latest or a checkpoint path")
        _at_least("input_size", m.input_size, 1)
        _one_of("seg_model", m.seg_model, SEG_MODELS)
        _at_least("unet_depth", m.unet_depth, 1)
        _at_least("unet_filters", m.unet_filters, 1)
        if m.task == "segmentation":
            stride = 2 ** m.unet_depth if m.seg_model == "unet" else 16
            if m.input_size % stride or (m.seg_model == "deeplabv3plus" and m.input_size < 32):
                raise ConfigError(
                    f"--input_size={m.input_size} must be a multiple of {stride} for "
                    f"--seg_model={m.seg_model}"
                    + (f" (--unet_depth={m.unet_depth})" if m.seg_model == "unet" else
                       " and at least 32"))
        _at_least("epochs", t.epochs, 1)
        _at_least("batch_size", t.batch_size, 1)
        _at_least("steps_per_epoch", t.steps_per_epoch, 0)
        _at_least("steps_per_loop", t.steps_per_loop, 1)
        _at_least("unfreeze_at", f.unfreeze_at, 0)
        _at_least("keep_checkpoints", t.keep_checkpoints, 1)
        _at_least("checkpoint_every_steps", t.checkpoint_every_steps, 0)
        _at_least("num_virtual_cpus", t.num_virtual_cpus, 0)
        _at_least("calibrate_bn_steps", t.calibrate_bn_steps, -1)
        for flag in ("max_bad_steps", "max_rollbacks", "summary_every", "histogram_every",
                     "image_every", "early_stop_patience", "plateau_patience"):
            _at_least(flag, getattr(t, flag), 0)
        if not 0.0 < t.bad_step_lr_factor <= 1.0:
            raise ConfigError(f"--bad_step_lr_factor={t.bad_step_lr_factor} must be in (0, 1]")
        if not 0.0 < t.plateau_factor < 1.0:
            raise ConfigError(f"--plateau_factor={t.plateau_factor} must be in (0, 1)")
        if not 0.0 <= t.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay={t.ema_decay} must be in [0, 1)")
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"--dropout={m.dropout} must be in [0, 1)")
        if not (o.learning_rate > 0 and math.isfinite(o.learning_rate)):
            raise ConfigError(f"--learning_rate={o.learning_rate} must be a finite number > 0")
        if not (t.max_loss_ratio >= 0 and math.isfinite(t.max_loss_ratio)):
            raise ConfigError(f"--max_loss_ratio={t.max_loss_ratio} must be a finite number >= 0")
        if not 0.0 <= o.momentum < 1.0:
            raise ConfigError(f"--momentum={o.momentum} must be in [0, 1)")
        if o.weight_decay < 0:
            raise ConfigError(f"--weight_decay={o.weight_decay} must be >= 0")
        if o.warmup_epochs < 0:
            raise ConfigError(f"--warmup_epochs={o.warmup_epochs} must be >= 0")
        if o.backbone_lr_multiplier < 0:
            raise ConfigError(
                f"--backbone_lr_multiplier={o.backbone_lr_multiplier} must be >= 0")
        if o.global_clipnorm < 0:
            raise ConfigError(f"--global_clipnorm={o.global_clipnorm} must be >= 0")
        if o.clipnorm < 0:
            raise ConfigError(f"--clipnorm={o.clipnorm} must be >= 0")
        if o.clipvalue < 0:
            raise ConfigError(f"--clipvalue={o.clipvalue} must be >= 0")
        if o.schedule == "step" and not o.lr_step_epochs:
            raise ConfigError("--lr_schedule=step needs --lr_step_epochs, e.g. 30,60")
        if list(o.lr_step_epochs) != sorted(set(o.lr_step_epochs)):
            raise ConfigError(
                f"--lr_step_epochs={','.join(map(str, o.lr_step_epochs))} must increase")
        if not _UNFREEZE_LAYERS.match(f.unfreeze_layers):
            raise ConfigError(
                f"--unfreeze_layers={f.unfreeze_layers} must be all, blocks:K or regex:PATTERN")
        if f.unfreeze_layers.startswith("regex:"):
            try:
                re.compile(f.unfreeze_layers[len("regex:"):])
            except re.error as e:
                raise ConfigError(f"--unfreeze_layers: bad pattern ({e})") from None
        for name in t.allow_changed:
            if name not in ALLOWABLE_CHANGES:
                raise ConfigError(f"--allow_changed={','.join(t.allow_changed)}: {name} is not "
                                  f"one of {', '.join(ALLOWABLE_CHANGES)}")
        b = self.benchmark
        _one_of("benchmark_input", b.input, BENCHMARK_INPUTS)
        compares = b.compares()
        for name in compares:
            if name not in BENCHMARK_COMPARES or name == "none":  # "none" alone gives ()
                raise ConfigError(f"--benchmark_compare={b.compare} is not one of "
                                  f"{', '.join(BENCHMARK_COMPARES)} (or a comma list of them)")
        if len(set(compares)) != len(compares):
            raise ConfigError(f"--benchmark_compare={b.compare} names a comparison twice")
        if "k1" in compares and t.steps_per_loop == 1:
            raise ConfigError("--benchmark_compare=k1 compares K=1 with --steps_per_loop, "
                              "which is 1: set --steps_per_loop > 1")
        if "mirrored1" in compares and t.strategy != "default":
            raise ConfigError(f"--benchmark_compare=mirrored1 compares a one-replica "
                              f"MirroredStrategy with --strategy=default, not {t.strategy}")
        _one_of("mixed_precision", t.mixed_precision, MIXED_PRECISIONS)
        _at_least("benchmark_windows", b.windows, 1)
        if not b.window_s > 0:
            raise ConfigError(f"--benchmark_window_s={b.window_s} must be > 0")
        if t.strategy == "default" and t.num_virtual_cpus > 1:
            raise ConfigError(
                "--num_virtual_cpus needs --strategy=mirrored (the default strategy has one replica)")
        return self


def _one_of(flag, value, choices):
    if value not in choices:
        raise ConfigError(f"--{flag}={value} is not one of {', '.join(choices)}")


def _at_least(flag, value, low):
    if value < low:
        raise ConfigError(f"--{flag}={value} must be >= {low}")
