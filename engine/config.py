"""Typed, frozen settings for one run, each declared once with its flag.

Every setting the engine reads lives here, so library code takes a Config
instead of reading absl FLAGS, and every invalid value is caught before any
TensorFlow work starts, with a message that names the flag a user typed.

A field is declared with `setting(default, help, ...)`: the flag's help, its
name (the field's unless flag=), the per-field checks Config.validated runs
and, where the flag's value is not the field's, how to convert it (parse=).
engine/flags.py generates the absl flags from this metadata and converts
them back; this module imports neither absl nor TensorFlow (train_main.py
imports it before TensorFlow). A new setting is one declaration:

    calibrate_bn_steps: int = setting(0, "Steps that re-estimate ... (0: off).",
                                      check=at_least(0))

The flag's kind follows the field's type: bool, int, float and str flags;
an Optional[...] field is a string flag whose empty value means None; a
Tuple[...] field is a comma-list flag.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from typing import Any, Callable, NamedTuple, Optional, Tuple

BACKBONES = ("inceptionv3", "resnet50", "mobilenetv2", "efficientnetb0", "tiny_cnn")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "cosine", "step")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")
MODES = ("train", "eval", "benchmark", "export", "predict")
# --threshold_objective: what the per-label threshold search maximises (engine/metrics.py).
THRESHOLD_OBJECTIVES = ("samples", "per_label")
TASKS = ("multilabel", "multiclass", "segmentation")
SEG_MODELS = ("unet", "deeplabv3plus")  # --task=segmentation (models/segmentation.py)
BENCHMARK_INPUTS = ("synthetic", "real", "both")
# --benchmark_compare: a comma list of these (engine/bench/run.py runs them side by side).
BENCHMARK_COMPARES = ("none", "keras_fit", "ema", "frozen", "mirrored1", "k1", "bf16", "xla")
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
# --unfreeze_schedule entries are split at commas followed by "EPOCH:", so a
# regex with a comma in it (regex:a{1,3}) stays whole.
_SCHEDULE_SPLIT = re.compile(r",(?=\s*[0-9]+\s*:)")


class ConfigError(ValueError):
    """A setting a user can fix; the message is one line naming the flag."""


# ------------------------------------------------------------------ metadata
# A check is called as check(flag, value) and raises ConfigError naming the flag.
Check = Callable[[str, Any], None]
FIELD_DEFAULT = object()  # Setting.flag_default: the flag's default is the field's


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a field's metadata says about its flag (see setting())."""
    help: str
    flag: Optional[str] = None  # the flag's name; None: the field's
    checks: Tuple[Check, ...] = ()
    # parse(value, flags): the field's value from its flag's; flags["name"] is
    # another flag's value and flags.given("name") whether it was given. A
    # ValueError's text follows "--flag=value " in the ConfigError.
    parse: Optional[Callable[[Any, Any], Any]] = None
    flag_default: Any = FIELD_DEFAULT
    aliases: Tuple[str, ...] = ()  # other names of the same flag (absl DEFINE_alias)
    section: Optional[str] = None  # --help section; None: the group's SECTION


def setting(default, help: str, *, flag: Optional[str] = None, check=(), parse=None,
            flag_default=FIELD_DEFAULT, aliases=(), section: Optional[str] = None):
    """A dataclass field with its flag: `x: int = setting(3, "Help.", check=at_least(1))`.

    check: one check or a tuple of them (at_least, within, one_of, ...).
    flag_default: when the flag's default differs from the field's (e.g.
    --input_size=0, converted by parse=, while Config() has 32).
    """
    checks = tuple(check) if isinstance(check, (tuple, list)) else (check,)
    meta = Setting(help, flag, checks, parse, flag_default, tuple(aliases), section)
    return dataclasses.field(default=default, metadata={"setting": meta})


class Spec(NamedTuple):
    """One setting as flags.py sees it: where it lives, its type and its flag."""
    group: str  # the Config field holding it: "model", "train", ...
    name: str  # the field's name in that group
    type: Any  # the resolved annotation (int, Optional[str], Tuple[int, ...], ...)
    default: Any  # the field's default
    flag: str
    flag_default: Any  # as given to setting(); FIELD_DEFAULT when not given
    section: str
    setting: Setting


def specs() -> Tuple[Spec, ...]:
    """Every setting, group by group in field order: the one list flags.py reads."""
    return _specs()


@functools.lru_cache(maxsize=None)
def _specs() -> Tuple[Spec, ...]:
    out = []
    for group in dataclasses.fields(Config):
        cls = group.default.__class__
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata.get("setting")
            if meta is None:
                raise TypeError(f"{cls.__name__}.{f.name} has no setting(...): every "
                                f"field needs its flag and help")
            out.append(Spec(group.name, f.name, hints[f.name], f.default, meta.flag or f.name,
                            meta.flag_default, meta.section or cls.SECTION, meta))
    return tuple(out)


# -------------------------------------------------------------------- checks
def _shown(value) -> str:
    """A value as a user typed it: lists comma-joined."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def one_of(choices) -> Check:
    def check(flag, value):
        if value not in choices:
            raise ConfigError(f"--{flag}={value} is not one of {', '.join(choices)}")
    return check


def at_least(low) -> Check:
    def check(flag, value):
        if value < low:
            raise ConfigError(f"--{flag}={value} must be >= {low}")
    return check


def above(low) -> Check:
    def check(flag, value):
        if not value > low:
            raise ConfigError(f"--{flag}={value} must be > {low}")
    return check


def within(interval: str) -> Check:
    """within("(0, 1]"): an interval as it reads in the message; NaN is outside."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    closed_low, closed_high = interval[0] == "[", interval[-1] == "]"

    def check(flag, value):
        inside = ((low <= value if closed_low else low < value) and
                  (value <= high if closed_high else value < high))
        if not inside:
            raise ConfigError(f"--{flag}={value} must be in {interval}")
    return check


def finite(at_least_or_above: str) -> Check:
    """finite("> 0") or finite(">= 0"): a finite number with that bound."""
    op, low = at_least_or_above.split()
    low = float(low)

    def check(flag, value):
        ok = value > low if op == ">" else value >= low
        if not (ok and math.isfinite(value)):
            raise ConfigError(f"--{flag}={value} must be a finite number {at_least_or_above}")
    return check


def not_blank(advice: str) -> Check:
    def check(flag, value):
        if not value.strip():
            raise ConfigError(f"--{flag} is empty: {advice}")
    return check


def increasing(flag, values) -> None:
    if list(values) != sorted(set(values)):
        raise ConfigError(f"--{flag}={_shown(values)} must increase")


def each_one_of(choices) -> Check:
    def check(flag, values):
        for name in values:
            if name not in choices:
                raise ConfigError(f"--{flag}={_shown(values)}: {name} is not one of "
                                  f"{', '.join(choices)}")
    return check


def unfreeze_layers_value(flag: str, value: str, whole: str = "") -> None:
    """One value as --unfreeze_layers takes it: all | blocks:K | regex:PATTERN."""
    shown = f"--{flag}={whole or value}" + (f": {value}" if whole else "")
    if not _UNFREEZE_LAYERS.match(value):
        raise ConfigError(f"{shown} must be all, blocks:K or regex:PATTERN")
    if value.startswith("regex:"):
        try:
            re.compile(value[len("regex:"):])
        except re.error as e:
            raise ConfigError(f"{shown}: bad pattern ({e})") from None


def _unfreeze_schedule_value(flag: str, value: str) -> None:
    parse_unfreeze_schedule(value)


def _compare_names(text: str) -> Tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    return () if names == ("none",) else names


def _compare_list(flag: str, value: str) -> None:
    compares = _compare_names(value)
    for name in compares:
        if name not in BENCHMARK_COMPARES or name == "none":  # "none" alone gives ()
            raise ConfigError(f"--{flag}={value} is not one of "
                              f"{', '.join(BENCHMARK_COMPARES)} (or a comma list of them)")
    if len(set(compares)) != len(compares):
        raise ConfigError(f"--{flag}={value} names a comparison twice")


# ------------------------------------------------------------------- parsers
def _input_size(value: int, flags) -> int:
    """--input_size=0: the backbone's default (64 for --task=segmentation)."""
    if value:
        return value
    return 64 if flags["task"] == "segmentation" else DEFAULT_INPUT_SIZE.get(flags["backbone"], 1)


def _loss_name(value: str, flags) -> str:
    """--loss, or for --task=segmentation without --loss its own default, ce."""
    return "ce" if flags["task"] == "segmentation" and not flags.given("loss") else value


def _empty_means(default):
    return lambda value, flags: value or default


HEALTH = "Training health"  # --help section of the non-finite guard, summaries, callbacks


# ---------------------------------------------------------------- the groups
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    SECTION = "Model"
    backbone: str = setting(
        "tiny_cnn", "inceptionv3, resnet50, mobilenetv2, efficientnetb0 or tiny_cnn",
        check=one_of(BACKBONES))
    input_size: int = setting(
        32, "Square input size in pixels (0: the backbone's default, e.g. 75 for inceptionv3; "
        "64 for --task=segmentation).", flag_default=0, parse=_input_size, check=at_least(1))
    weights: Optional[str] = setting(  # None, "imagenet" or a local weights file
        None, "Backbone weights: empty (random), 'imagenet' (needs network) or a local "
        ".h5/.weights.h5 file.")
    dropout: float = setting(0.0, "Dropout before the head's logits.", check=within("[0, 1)"))
    task: str = setting(
        "multilabel", "multilabel (sigmoid logits), multiclass (softmax logits) or segmentation "
        "(per-pixel softmax logits).", check=one_of(TASKS))
    # With several replicas, unsynchronized BN keeps one set of moving
    # statistics per replica (Keras creates them with aggregation "none"), and
    # checkpoints/eval silently use replica 0's. So sync is the default.
    sync_bn: bool = setting(
        True, "Synchronize BatchNorm statistics across replicas (only matters with several; "
        "--nosync_bn lets them drift apart).")
    # --task=segmentation only: the model brings its own encoder (--backbone is not used).
    seg_model: str = setting(
        "unet", "--task=segmentation: unet or deeplabv3plus (MobileNetV2 encoder); --backbone "
        "is not used.", check=one_of(SEG_MODELS))
    unet_depth: int = setting(
        4, "U-Net poolings (--input_size must be a multiple of 2^depth).", check=at_least(1))
    unet_filters: int = setting(
        16, "U-Net channels at the first level, doubled at each deeper one.", check=at_least(1))
    bn_momentum: Optional[float] = setting(
        0.9, "BatchNorm moving-statistics momentum; empty keeps the architecture's own (0.99).")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    SECTION = "Data"
    data_dir: Optional[str] = setting(
        None, "User data (TFRecords or images + labels.csv); empty: the embedded dataset.")
    cache_dir: str = setting("~/.cache/tapeworks",
                             "Where the embedded dataset is made on first use.")
    augment: bool = setting(True, "Random flips while training.")
    skip_bad_records: bool = setting(
        False, "Check every record when the data is opened and train without the bad ones "
        "(undecodable image, wrong-size image, wrong label width, corrupt TFRecord record, CSV "
        "row naming no file), counting them in the epoch report; without it a bad record stops "
        "the run naming file and record.")
    decoded_cache_mb: int = setting(
        1024, "Decode the training and validation images once and keep them in memory when a "
        "split takes at most this many MB as float32 pixels at --input_size (0: decode every "
        "epoch).", check=at_least(0))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    SECTION = "Optimizer"
    name: str = setting("adam", "sgd, momentum, adam, adamw or rmsprop.", flag="optimizer",
                        check=one_of(OPTIMIZERS))
    learning_rate: float = setting(0.001, "Peak learning rate.", check=finite("> 0"))
    momentum: float = setting(0.9, "Momentum for momentum/rmsprop.", check=within("[0, 1)"))
    weight_decay: float = setting(0.0, "Decoupled weight decay (0: off).", check=at_least(0))
    schedule: str = setting("cosine", "constant, cosine or step.", flag="lr_schedule",
                            check=one_of(SCHEDULES))
    warmup_epochs: float = setting(0.0, "Linear warmup length in epochs.", check=at_least(0))
    lr_step_epochs: Tuple[int, ...] = setting(
        (), "Epochs at which --lr_schedule=step multiplies by --lr_step_factor.",
        check=increasing)
    lr_step_factor: float = setting(0.1, "Factor of each step of the step schedule.")
    backbone_lr_multiplier: float = setting(
        1.0, "Backbone LR = LR x this, after unfreezing.", check=at_least(0))
    layer_lr_decay: float = setting(
        1.0, "Layer-wise LR decay in (0, 1]: a backbone block k blocks below the top one trains "
        "at LR x --backbone_lr_multiplier x this^k, with its own optimizer (1: off).",
        check=within("(0, 1]"))
    restart_at_unfreeze: bool = setting(
        True, "With --unfreeze_at, the frozen epochs follow the run-long schedule and "
        "fine-tuning starts it again from the peak (warmup included) over the epochs left; "
        "--nolr_restart_at_unfreeze: one schedule over the run (the step schedule never "
        "restarts).", flag="lr_restart_at_unfreeze")
    # Clipping applies to the replica-summed gradients, in the order
    # clipvalue -> clipnorm (per variable) -> global_clipnorm.
    global_clipnorm: float = setting(
        0.0, "Clip the replica-summed gradient to this global norm (0: off).", check=at_least(0))
    clipnorm: float = setting(
        0.0, "Clip each variable's replica-summed gradient to this norm (0: off).",
        check=at_least(0))
    clipvalue: float = setting(
        0.0, "Clip each replica-summed gradient element to [-v, v] (0: off). Order: clipvalue, "
        "clipnorm, global_clipnorm.", check=at_least(0))


@dataclasses.dataclass(frozen=True)
class FreezeConfig:
    SECTION = "Freeze"
    unfreeze_at: int = setting(
        0, "Backbone frozen for the first N epochs, trained from epoch N+1 (0: from the start).",
        check=at_least(0))
    unfreeze_layers: str = setting(
        "all", "What thaws: all, blocks:K (last K blocks) or regex:PATTERN.",
        check=unfreeze_layers_value)
    freeze_bn: bool = setting(False, "Keep backbone BatchNorm frozen after unfreezing.")
    # Empty: the two phases of the flags above (see parse_unfreeze_schedule).
    unfreeze_schedule: str = setting(
        "", "Gradual unfreezing, EPOCH:WHAT,... e.g. 3:blocks:2,6:blocks:5,9:all: from epoch "
        "EPOCH+1 on (as --unfreeze_at=EPOCH) WHAT trains (as --unfreeze_layers); frozen before "
        "the first; replaces --unfreeze_at/--unfreeze_layers.", check=_unfreeze_schedule_value)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    SECTION = "Loss"
    loss: str = setting(
        "bce", "bce, weighted_bce, focal, fbeta, bce+fbeta, cce, sparse_cce; segmentation: ce "
        "(its default), dice, lovasz, ce+lovasz, ...", parse=_loss_name)
    pos_weight: Optional[str] = setting(  # None | "auto" | "w1,w2,..."
        None, "weighted_bce: 'auto' (from label density), 'w1,w2,...' or empty.")
    focal_gamma: float = setting(2.0, "Focal loss gamma.")
    focal_alpha: float = setting(0.25, "Focal loss alpha.")
    fbeta: float = setting(2.0, "Beta of the F-beta loss and metrics.")
    fbeta_weight: float = setting(0.5, "Weight of fbeta in bce+fbeta.")
    label_smoothing: float = setting(0.0, "Label smoothing for cross-entropy.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    SECTION = "Run"
    model_dir: str = setting("runs/default",
                             "Checkpoints, logs and flags; the same dir again resumes.")
    # Never discards a checkpoint that can be resumed (engine/run_dir.py).
    overwrite: bool = setting(
        False, "Start fresh on a --model_dir that holds an earlier run's results but no "
        "checkpoint to resume, moving them to model_dir/overwritten/<UTC time>/ (never deleted). "
        "A resumable checkpoint is still resumed. Not saved in flags.txt.")
    # The README run (--unfreeze_at=5): 5 frozen epochs, then 7 of fine-tuning,
    # which a random-init backbone needs (BUILD_NOTES.md, "The README run's recipe").
    epochs: int = setting(12, "Number of epochs.", check=at_least(1))
    batch_size: int = setting(32, "Global batch size over all replicas.", check=at_least(1))
    steps_per_epoch: int = setting(0, "Cap on steps per epoch (0: the whole split).",
                                   check=at_least(0))
    steps_per_loop: int = setting(10, "Train steps run inside one traced call.",
                                  check=at_least(1))
    seed: int = setting(0, "Seed for weights, shuffling and augmentation.")
    deterministic: bool = setting(False, "Deterministic ops: a resumed run ends bit-identical.")
    checkpoint_every_steps: int = setting(
        0, "Also checkpoint every N steps (0: per epoch only).", check=at_least(0))
    keep_checkpoints: int = setting(3, "Rolling checkpoints kept.", check=at_least(1))
    best_metric: str = setting("val_loss", "Validation metric that picks the best checkpoint.")
    best_mode: str = setting("min", "min or max for --best_metric.", check=one_of(("min", "max")))
    strategy: str = setting("default", "auto, default, one_device, mirrored or multi_worker.",
                            check=one_of(STRATEGIES))
    num_virtual_cpus: int = setting(0, "Split the CPU into N devices (tests, mirrored).",
                                    check=at_least(0))
    progress: bool = setting(True, "Show a tqdm bar per epoch.")
    init_checkpoint: Optional[str] = setting(
        None, "Warm start the model weights (only) when --model_dir has no checkpoint: a "
        "tapeworks run dir or checkpoint, a tf.train.Checkpoint of a Keras model, a name-based "
        "(TF1/Keras 2) checkpoint, or a Keras .weights.h5/.keras/.h5 file. Prints what matched.")
    init_include: Tuple[str, ...] = setting(
        (), "Key patterns (fnmatch on the whole key, e.g. model/backbone/*) restored by "
        "--init_checkpoint; a pattern matching no model tensor is an error.")
    init_exclude: Tuple[str, ...] = setting(
        (), "Key patterns (fnmatch, e.g. model/head/*) not restored by --init_checkpoint; a "
        "pattern matching no model tensor is an error.")
    # Below it a warm start stops with an error: see warm_start.py.
    init_min_fraction: float = setting(
        0.5, "--init_checkpoint must match at least this share of the selected model tensors "
        "and of their parameters, else the run stops (exit 2).", check=within("[0, 1]"))
    allow_partial_restore: bool = setting(
        False, "Resume even when model tensors are missing; warm start (or --weights) even "
        "below --init_min_fraction or with nothing matched.")
    # engine/manifest.py STATE says what each change means for the saved state.
    allow_changed: Tuple[str, ...] = setting(
        (), "On resume, accept a change of these settings although it changes what the saved "
        "state means (optimizer, labels, task, input_size, batch_size); the state it affects "
        "starts fresh and the log says so. Never saved in flags.txt.",
        check=each_one_of(ALLOWABLE_CHANGES))
    ema_decay: float = setting(0.0, "EMA decay of the weights (0: off).", check=within("[0, 1)"))
    ema_warmup: bool = setting(True, "Decay grows as min(decay, (1+n)/(10+n)).")
    eval_with_ema: bool = setting(True, "Also evaluate the EMA weights.")
    calibrate_bn_steps: int = setting(
        -1, "Re-estimate every BatchNorm layer's moving statistics from this many training "
        "batches (forward passes in training mode, no weight update) once, at the start of a "
        "fresh run, before the first (frozen) phase; never on resume. -1: auto "
        f"({AUTO_CALIBRATE_BN_STEPS} for a random init, 0 when --weights or --init_checkpoint "
        "load weights); 0: off.", check=at_least(-1))
    ema_calibrate_bn: bool = setting(
        False, "Re-estimate BatchNorm statistics for the EMA weights (over --calibrate_bn_steps "
        "batches, or the auto number when that is <= 0) before each EMA evaluation and before "
        "an EMA export; the raw weights and statistics come back exactly.")
    export_raw: bool = setting(False, "--mode=export writes the raw weights, not the EMA ones.")
    export_from: str = setting(
        "best", "--mode=export: best (model_dir/best/, the checkpoint --best_metric picked; the "
        "latest, with a note, when best/ is empty), latest (the newest in model_dir/checkpoints/) "
        "or a checkpoint path prefix (e.g. runs/x/checkpoints/ckpt-120).",
        check=not_blank("give best, latest or a checkpoint path"))
    # See engine/metrics.py and BUILD_NOTES.
    threshold_objective: str = setting(
        "per_label", "What each label's decision threshold is searched to maximise on the "
        "validation split: per_label (each label's own F-beta, independently) or samples (the "
        "mean per-image F-beta, labels coupled; can leave a rare label never predicted).",
        check=one_of(THRESHOLD_OBJECTIVES))
    # Non-finite guard (engine/health.py): a step whose loss or gradients are
    # not finite changes nothing and is counted.
    max_bad_steps: int = setting(
        5, "Steps whose loss or gradients are not finite are skipped (nothing changes); after "
        "this many in a row, roll back to the last good checkpoint (0: never roll back).",
        check=at_least(0), section=HEALTH)
    max_rollbacks: int = setting(
        3, "Rollbacks allowed before the run stops with a diagnosis naming the first non-finite "
        "layer.", check=at_least(0), section=HEALTH)
    max_loss_ratio: float = setting(
        1000.0, "A train call's mean loss or the val loss above this many times the prevalence "
        "baseline's val loss counts as divergence, like --max_bad_steps: roll back, then stop "
        "with a diagnosis (0: off).", check=finite(">= 0"), section=HEALTH)
    bad_step_lr_factor: float = setting(
        0.5, "Learning rate multiplier applied at each rollback.", check=within("(0, 1]"),
        section=HEALTH)
    # In-graph TensorBoard summaries (0: off).
    summary_every: int = setting(
        10, "TensorBoard scalars from inside the step (lr, global and per-layer gradient norms, "
        "loss) every N steps (0: off).", check=at_least(0), section=HEALTH)
    histogram_every: int = setting(
        0, "Weight and gradient histograms every N steps (0: off).", check=at_least(0),
        section=HEALTH)
    image_every: int = setting(
        0, "A few input images with their predictions every N steps (0: off).",
        check=at_least(0), section=HEALTH)
    # Epoch callbacks on --best_metric/--best_mode (0: off).
    early_stop_patience: int = setting(
        0, "Stop after N epochs without improvement of --best_metric (0: off).",
        check=at_least(0), section=HEALTH)
    plateau_patience: int = setting(
        0, "Multiply the learning rate by --plateau_factor after N epochs without improvement "
        "of --best_metric (0: off).", check=at_least(0), section=HEALTH)
    plateau_factor: float = setting(0.1, "Learning rate factor of --plateau_patience.",
                                    check=within("(0, 1)"), section=HEALTH)
    # Only --mode=benchmark honours these two so far (engine/bench/run.py sets
    # the Keras policy; XLA needs a hook in engine/steps.py, see there).
    mixed_precision: str = setting(
        "float32", "float32, bfloat16 or float16 (Keras mixed policies: float32 weights and "
        "logits; float16 with dynamic loss scaling in the train step).",
        check=one_of(MIXED_PRECISIONS), section=HEALTH)
    jit_compile: bool = setting(  # slower on CPU (DESIGN.md)
        False, "XLA-compile each replica's forward/backward pass (one replica only; off by "
        "default: about 6x slower for MobileNetV2 on this CPU).", section=HEALTH)


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """--mode=benchmark only: timed windows of the train step (engine/bench/)."""
    SECTION = "Benchmark (--mode=benchmark)"
    window_s: float = setting(2.0, "Minimum length of each timed window, seconds.",
                              flag="benchmark_window_s", check=above(0))
    windows: int = setting(5, "Timed windows per arm.", flag="benchmark_windows",
                           check=at_least(1))
    input: str = setting(
        "synthetic", "synthetic (one in-memory batch), real (the training pipeline) or both "
        "(alternated).", flag="benchmark_input", aliases=("input",),
        check=one_of(BENCHMARK_INPUTS))
    compare: str = setting(
        "none", "none, or a comma list of: keras_fit (Keras model.fit, same model and data), ema "
        "(EMA on vs off), frozen (frozen vs unfrozen phase), mirrored1 (one-replica "
        "MirroredStrategy vs default), k1 (1 step per call vs --steps_per_loop), bf16 (bfloat16 "
        "vs float32), xla (--jit_compile on vs off); all timed side by side, alternated.",
        flag="benchmark_compare", aliases=("compare",),
        parse=_empty_means("none"), check=_compare_list)
    xla_steps_per_loop: int = setting(
        0, "Steps per call of the xla comparison's arm (0: --steps_per_loop). A window is whole "
        "calls, so where XLA is much slower fewer steps per call keep its windows short.",
        flag="benchmark_xla_steps_per_loop", check=at_least(0))

    def compares(self) -> Tuple[str, ...]:
        """--benchmark_compare as a tuple of names (empty for none)."""
        return _compare_names(self.compare)


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """--mode=predict only (engine/predict.py): what to predict on, where to, with what."""
    SECTION = "Predict (--mode=predict)"
    input: str = setting(
        "", "--mode=predict: a folder of .png/.jpg/.jpeg images, a CSV with an image_name column "
        "(names resolved in the CSV's folder or its images/ subfolder, as for training) or a "
        "text file of image paths (one a line), or TFRecords (a .tfrecord file, a glob, or a "
        "folder of them).", flag="predict_input")
    output: str = setting(
        "", "--mode=predict: the CSV to write (image_name,tags: the labels whose probability >= "
        "its threshold, space-separated); <stem>_probabilities.csv goes next to it. "
        "Segmentation: image_name,mask and <stem>_masks/NAME.png (class ids).",
        flag="predict_output")
    model: str = setting(
        "", "--mode=predict: an exported SavedModel dir (labels and thresholds from its "
        "metadata); empty: the --model_dir checkpoint --export_from picks (EMA weights unless "
        "--export_raw), thresholds searched on val as export does.", flag="predict_model")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    freeze: FreezeConfig = FreezeConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    predict: PredictConfig = PredictConfig()

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

    def replace(self, **groups) -> "Config":
        """Returns a copy with some fields of some groups changed.

        Example: config.replace(train={"epochs": 2}, model={"backbone": "tiny_cnn"}).
        """
        changes = {name: dataclasses.replace(getattr(self, name), **fields)
                   for name, fields in groups.items()}
        return dataclasses.replace(self, **changes).validated()

    def validated(self) -> "Config":
        """Returns self, or raises ConfigError naming the first bad flag.

        First each field's own checks (its setting(check=...)), in field
        order; then the checks that relate several fields.
        """
        for spec in specs():
            value = getattr(getattr(self, spec.group), spec.name)
            for check in spec.setting.checks:
                check(spec.flag, value)
        _check_across(self)
        return self


def _check_across(c: Config) -> None:
    """The checks that involve more than one field (each field's own passed)."""
    m, o, f, t, b = c.model, c.optimizer, c.freeze, c.train, c.benchmark
    if m.task == "segmentation":
        stride = 2 ** m.unet_depth if m.seg_model == "unet" else 16
        if m.input_size % stride or (m.seg_model == "deeplabv3plus" and m.input_size < 32):
            raise ConfigError(
                f"--input_size={m.input_size} must be a multiple of {stride} for "
                f"--seg_model={m.seg_model}"
                + (f" (--unet_depth={m.unet_depth})" if m.seg_model == "unet" else
                   " and at least 32"))
    if o.schedule == "step" and not o.lr_step_epochs:
        raise ConfigError("--lr_schedule=step needs --lr_step_epochs, e.g. 30,60")
    if f.unfreeze_schedule and (f.unfreeze_at != 0 or f.unfreeze_layers != "all"):
        raise ConfigError("--unfreeze_schedule replaces --unfreeze_at and --unfreeze_layers; "
                          "give the whole schedule there and drop the other two")
    compares = b.compares()
    if "k1" in compares and t.steps_per_loop == 1:
        raise ConfigError("--benchmark_compare=k1 compares K=1 with --steps_per_loop, "
                          "which is 1: set --steps_per_loop > 1")
    if "bf16" in compares and t.mixed_precision == "float16":
        raise ConfigError("--benchmark_compare=bf16 compares bfloat16 with float32: "
                          "--mixed_precision must be float32 or bfloat16, not float16")
    if "mirrored1" in compares and t.strategy != "default":
        raise ConfigError(f"--benchmark_compare=mirrored1 compares a one-replica "
                          f"MirroredStrategy with --strategy=default, not {t.strategy}")
    if t.strategy == "default" and t.num_virtual_cpus > 1:
        raise ConfigError(
            "--num_virtual_cpus needs --strategy=mirrored (the default strategy has one replica)")


def parse_unfreeze_schedule(text: str) -> Tuple[Tuple[int, str], ...]:
    """--unfreeze_schedule as ((epoch, what), ...); () when empty.

    "3:blocks:2,6:blocks:5,9:all": epochs are 0-based starts (3 means from
    the 4th epoch on, as --unfreeze_at=3) and strictly increasing; each what
    is one --unfreeze_layers value, each different (a repeat would change
    nothing). Pure, so Config.validated catches a bad schedule before any
    TensorFlow work; engine/freeze.py turns it into phases.
    """
    if not text.strip():
        return ()
    out = []
    for entry in _SCHEDULE_SPLIT.split(text.strip()):
        epoch, _, what = entry.strip().partition(":")
        if not epoch.strip().isdigit() or not what:
            raise ConfigError(f"--unfreeze_schedule={text}: '{entry}' is not EPOCH:WHAT "
                              f"(e.g. 3:blocks:2,6:all)")
        out.append((int(epoch), what.strip()))
        unfreeze_layers_value("unfreeze_schedule", out[-1][1], whole=text)
    epochs = [e for e, _ in out]
    if epochs != sorted(set(epochs)):
        raise ConfigError(f"--unfreeze_schedule={text}: the epochs must increase")
    whats = [w for _, w in out]
    repeated = [w for i, w in enumerate(whats) if w in whats[:i]]
    if repeated:
        raise ConfigError(f"--unfreeze_schedule={text}: {repeated[0]} appears twice; "
                          f"each phase must name another WHAT (it is the phase's name)")
    return tuple(out)
