"""absl flag definitions and the one mapping from flags to a Config.

Only train_main.py imports this module; the library takes a Config. Flags
are plain strings/numbers here and validated once, in Config.validated, so
a bad value gives the same one-line message from the CLI and from code.
"""
from __future__ import annotations

from absl import flags

from engine.config import (AUTO_CALIBRATE_BN_STEPS, DEFAULT_INPUT_SIZE, Config, ConfigError, DataConfig, FreezeConfig, LossConfig, ModelConfig,
                           OptimizerConfig, TrainConfig)
from engine.config import BenchmarkConfig  # --mode=benchmark

_d = Config()  # defaults live in one place: the dataclasses

# Model
flags.DEFINE_string("backbone", "tiny_cnn", "inceptionv3, resnet50, mobilenetv2, efficientnetb0 or tiny_cnn")
flags.DEFINE_integer("input_size", 0, "Square input size in pixels (0: the backbone's default, e.g. 75 for inceptionv3; 64 for --task=segmentation).")
flags.DEFINE_string("weights", "", "Backbone weights: empty (random), 'imagenet' (needs network) or a local .h5/.weights.h5 file.")
flags.DEFINE_float("dropout", _d.model.dropout, "Dropout before the head's logits.")
flags.DEFINE_string("task", _d.model.task, "multilabel (sigmoid logits), multiclass (softmax logits) or segmentation (per-pixel softmax logits).")
flags.DEFINE_boolean("sync_bn", _d.model.sync_bn, "Synchronize BatchNorm statistics across replicas (only matters with several; --nosync_bn lets them drift apart).")
flags.DEFINE_string("seg_model", _d.model.seg_model, "--task=segmentation: unet or deeplabv3plus (MobileNetV2 encoder); --backbone is not used.")
flags.DEFINE_integer("unet_depth", _d.model.unet_depth, "U-Net poolings (--input_size must be a multiple of 2^depth).")
flags.DEFINE_integer("unet_filters", _d.model.unet_filters, "U-Net channels at the first level, doubled at each deeper one.")
flags.DEFINE_string("bn_momentum", str(_d.model.bn_momentum), "BatchNorm moving-statistics momentum; empty keeps the architecture's own (0.99).")
# Data
flags.DEFINE_string("data_dir", "", "User data (TFRecords or images + labels.csv); empty: the embedded dataset.")
flags.DEFINE_string("cache_dir", _d.data.cache_dir, "Where the embedded dataset is made on first use.")
flags.DEFINE_boolean("augment", _d.data.augment, "Random flips while training.")
flags.DEFINE_boolean("skip_bad_records", _d.data.skip_bad_records, "Check every record when the data is opened and train without the bad ones (undecodable image, wrong-size image, wrong label width, corrupt TFRecord record, CSV row naming no file), counting them in the epoch report; without it a bad record stops the run naming file and record.")
flags.DEFINE_integer("decoded_cache_mb", _d.data.decoded_cache_mb, "Decode the training and validation images once and keep them in memory when a split takes at most this many MB as float32 pixels at --input_size (0: decode every epoch).")
# Optimizer
flags.DEFINE_string("optimizer", _d.optimizer.name, "sgd, momentum, adam, adamw or rmsprop.")
flags.DEFINE_float("learning_rate", _d.optimizer.learning_rate, "Peak learning rate.")
flags.DEFINE_float("momentum", _d.optimizer.momentum, "Momentum for momentum/rmsprop.")
flags.DEFINE_float("weight_decay", _d.optimizer.weight_decay, "Decoupled weight decay (0: off).")
flags.DEFINE_string("lr_schedule", _d.optimizer.schedule, "constant, cosine or step.")
flags.DEFINE_float("warmup_epochs", _d.optimizer.warmup_epochs, "Linear warmup length in epochs.")
flags.DEFINE_list("lr_step_epochs", [], "Epochs at which --lr_schedule=step multiplies by --lr_step_factor.")
flags.DEFINE_float("lr_step_factor", _d.optimizer.lr_step_factor, "Factor of each step of the step schedule.")
flags.DEFINE_boolean("lr_restart_at_unfreeze", _d.optimizer.restart_at_unfreeze, "With --unfreeze_at, the frozen epochs follow the run-long schedule and fine-tuning starts it again from the peak (warmup included) over the epochs left; --nolr_restart_at_unfreeze: one schedule over the run (the step schedule never restarts).")
flags.DEFINE_float("backbone_lr_multiplier", _d.optimizer.backbone_lr_multiplier, "Backbone LR = LR x this, after unfreezing.")
flags.DEFINE_float("global_clipnorm", _d.optimizer.global_clipnorm, "Clip the replica-summed gradient to this global norm (0: off).")
flags.DEFINE_float("clipnorm", _d.optimizer.clipnorm, "Clip each variable's replica-summed gradient to this norm (0: off).")
flags.DEFINE_float("clipvalue", _d.optimizer.clipvalue, "Clip each replica-summed gradient element to [-v, v] (0: off). Order: clipvalue, clipnorm, global_clipnorm.")
# Freeze
flags.DEFINE_integer("unfreeze_at", _d.freeze.unfreeze_at, "Backbone frozen for the first N epochs, trained from epoch N+1 (0: from the start).")
flags.DEFINE_string("unfreeze_layers", _d.freeze.unfreeze_layers, "What thaws: all, blocks:K (last K blocks) or regex:PATTERN.")
flags.DEFINE_boolean("freeze_bn", _d.freeze.freeze_bn, "Keep backbone BatchNorm frozen after unfreezing.")
# Loss
flags.DEFINE_string("loss", _d.loss.loss, "bce, weighted_bce, focal, fbeta, bce+fbeta, cce, sparse_cce; segmentation: ce (its default), dice, lovasz, ce+lovasz, ...")
flags.DEFINE_string("pos_weight", "", "weighted_bce: 'auto' (from label density), 'w1,w2,...' or empty.")
flags.DEFINE_float("focal_gamma", _d.loss.focal_gamma, "Focal loss gamma.")
flags.DEFINE_float("focal_alpha", _d.loss.focal_alpha, "Focal loss alpha.")
flags.DEFINE_float("fbeta", _d.loss.fbeta, "Beta of the F-beta loss and metrics.")
flags.DEFINE_float("fbeta_weight", _d.loss.fbeta_weight, "Weight of fbeta in bce+fbeta.")
flags.DEFINE_float("label_smoothing", _d.loss.label_smoothing, "Label smoothing for cross-entropy.")
# Run
flags.DEFINE_string("mode", "train", "train, eval, benchmark or export.")
flags.DEFINE_string("model_dir", _d.train.model_dir, "Checkpoints, logs and flags; the same dir again resumes.")
flags.DEFINE_integer("epochs", _d.train.epochs, "Number of epochs.")
flags.DEFINE_integer("batch_size", _d.train.batch_size, "Global batch size over all replicas.")
flags.DEFINE_integer("steps_per_epoch", _d.train.steps_per_epoch, "Cap on steps per epoch (0: the whole split).")
flags.DEFINE_integer("steps_per_loop", _d.train.steps_per_loop, "Train steps run inside one traced call.")
flags.DEFINE_integer("seed", _d.train.seed, "Seed for weights, shuffling and augmentation.")
flags.DEFINE_boolean("deterministic", _d.train.deterministic, "Deterministic ops: a resumed run ends bit-identical.")
flags.DEFINE_integer("checkpoint_every_steps", _d.train.checkpoint_every_steps, "Also checkpoint every N steps (0: per epoch only).")
flags.DEFINE_integer("keep_checkpoints", _d.train.keep_checkpoints, "Rolling checkpoints kept.")
flags.DEFINE_string("best_metric", _d.train.best_metric, "Validation metric that picks the best checkpoint.")
flags.DEFINE_string("best_mode", _d.train.best_mode, "min or max for --best_metric.")
flags.DEFINE_string("strategy", _d.train.strategy, "auto, default, one_device, mirrored or multi_worker.")
flags.DEFINE_integer("num_virtual_cpus", _d.train.num_virtual_cpus, "Split the CPU into N devices (tests, mirrored).")
flags.DEFINE_boolean("progress", _d.train.progress, "Show a tqdm bar per epoch.")
flags.DEFINE_string("init_checkpoint", "", "Warm start from a tapeworks checkpoint or Keras weights file.")
flags.DEFINE_list("init_include", [], "Key patterns (fnmatch) restored by --init_checkpoint.")
flags.DEFINE_list("init_exclude", [], "Key patterns (fnmatch) not restored by --init_checkpoint.")
flags.DEFINE_boolean("allow_partial_restore", _d.train.allow_partial_restore, "Resume even when model tensors are missing.")
flags.DEFINE_list("allow_changed", [], "On resume, accept a change of these settings although it changes what the saved state means (optimizer, labels, task, input_size, batch_size); the state it affects starts fresh and the log says so. Never saved in flags.txt.")
flags.DEFINE_float("ema_decay", _d.train.ema_decay, "EMA decay of the weights (0: off).")
flags.DEFINE_boolean("ema_warmup", _d.train.ema_warmup, "Decay grows as min(decay, (1+n)/(10+n)).")
flags.DEFINE_boolean("eval_with_ema", _d.train.eval_with_ema, "Also evaluate the EMA weights.")
flags.DEFINE_integer("calibrate_bn_steps", _d.train.calibrate_bn_steps, "Re-estimate every BatchNorm layer's moving statistics from this many training batches (forward passes in training mode, no weight update) once, at the start of a fresh run, before the first (frozen) phase; never on resume. -1: auto (%d for a random init, 0 when --weights or --init_checkpoint load weights); 0: off." % AUTO_CALIBRATE_BN_STEPS)
flags.DEFINE_boolean("ema_calibrate_bn", _d.train.ema_calibrate_bn, "Re-estimate BatchNorm statistics for the EMA weights (over --calibrate_bn_steps batches, or the auto number when that is <= 0) before each EMA evaluation and before an EMA export; the raw weights and statistics come back exactly.")
flags.DEFINE_boolean("export_raw", _d.train.export_raw, "--mode=export writes the raw weights, not the EMA ones.")
flags.DEFINE_string("export_from", _d.train.export_from, "--mode=export: best (model_dir/best/, the checkpoint --best_metric picked; the latest, with a note, when best/ is empty), latest (the newest in model_dir/checkpoints/) or a checkpoint path prefix (e.g. runs/x/checkpoints/ckpt-120).")
flags.DEFINE_string("threshold_objective", _d.train.threshold_objective, "What each label's decision threshold is searched to maximise on the validation split: per_label (each label's own F-beta, independently) or samples (the mean per-image F-beta, labels coupled; can leave a rare label never predicted).")
# Training health
flags.DEFINE_integer("max_bad_steps", _d.train.max_bad_steps, "Steps whose loss or gradients are not finite are skipped (nothing changes); after this many in a row, roll back to the last good checkpoint (0: never roll back).")
flags.DEFINE_integer("max_rollbacks", _d.train.max_rollbacks, "Rollbacks allowed before the run stops with a diagnosis naming the first non-finite layer.")
flags.DEFINE_float("max_loss_ratio", _d.train.max_loss_ratio, "A train call's mean loss or the val loss above this many times the prevalence baseline's val loss counts as divergence, like --max_bad_steps: roll back, then stop with a diagnosis (0: off).")
flags.DEFINE_float("bad_step_lr_factor", _d.train.bad_step_lr_factor, "Learning rate multiplier applied at each rollback.")
flags.DEFINE_integer("summary_every", _d.train.summary_every, "TensorBoard scalars from inside the step (lr, global and per-layer gradient norms, loss) every N steps (0: off).")
flags.DEFINE_integer("histogram_every", _d.train.histogram_every, "Weight and gradient histograms every N steps (0: off).")
flags.DEFINE_integer("image_every", _d.train.image_every, "A few input images with their predictions every N steps (0: off).")
flags.DEFINE_integer("early_stop_patience", _d.train.early_stop_patience, "Stop after N epochs without improvement of --best_metric (0: off).")
flags.DEFINE_integer("plateau_patience", _d.train.plateau_patience, "Multiply the learning rate by --plateau_factor after N epochs without improvement of --best_metric (0: off).")
flags.DEFINE_float("plateau_factor", _d.train.plateau_factor, "Learning rate factor of --plateau_patience.")
flags.DEFINE_string("mixed_precision", _d.train.mixed_precision, "float32, bfloat16 or float16 (Keras mixed policies: float32 weights and logits; float16 with dynamic loss scaling in the train step).")
flags.DEFINE_boolean("jit_compile", _d.train.jit_compile, "XLA-compile each replica's forward/backward pass (one replica only; off by default: about 6x slower for MobileNetV2 on this CPU).")
# Benchmark (--mode=benchmark)
flags.DEFINE_float("benchmark_window_s", _d.benchmark.window_s, "Minimum length of each timed window, seconds.")
flags.DEFINE_integer("benchmark_windows", _d.benchmark.windows, "Timed windows per arm.")
flags.DEFINE_string("benchmark_input", _d.benchmark.input, "synthetic (one in-memory batch), real (the training pipeline) or both (alternated).")
flags.DEFINE_string("benchmark_compare", _d.benchmark.compare, "none, or a comma list of: keras_fit (Keras model.fit, same model and data), ema (EMA on vs off), frozen (frozen vs unfrozen phase), mirrored1 (one-replica MirroredStrategy vs default), k1 (1 step per call vs --steps_per_loop); all timed side by side, alternated.")

# The names the benchmark issue and users type: --compare=keras_fit, --input=real.
_ALIASES = {"compare": "benchmark_compare", "input": "benchmark_input"}
for _alias, _name in _ALIASES.items():
    flags.DEFINE_alias(_alias, _name)


def _int_list(flag: str, values) -> tuple:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ConfigError(f"--{flag}={','.join(values)} must be a comma list of integers") from None


def _optional_float(flag: str, text: str):
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--{flag}={text} must be a number or empty") from None


def _loss_name(f) -> str:
    """--loss, or for --task=segmentation without --loss its own default, ce."""
    if f.task == "segmentation" and not f["loss"].present:
        return "ce"
    return f.loss


def config_from_flags(f=flags.FLAGS) -> Config:
    """The one place flags become settings."""
    return Config(
        model=ModelConfig(backbone=f.backbone,
                          input_size=f.input_size or (64 if f.task == "segmentation" else DEFAULT_INPUT_SIZE.get(f.backbone, 1)), weights=f.weights or None,
                          dropout=f.dropout, task=f.task, sync_bn=f.sync_bn,
                          bn_momentum=_optional_float("bn_momentum", f.bn_momentum),
                          seg_model=f.seg_model, unet_depth=f.unet_depth,
                          unet_filters=f.unet_filters),
        data=DataConfig(data_dir=f.data_dir or None, cache_dir=f.cache_dir, augment=f.augment,
                        skip_bad_records=f.skip_bad_records,
                        decoded_cache_mb=f.decoded_cache_mb),
        optimizer=OptimizerConfig(
            name=f.optimizer, learning_rate=f.learning_rate, momentum=f.momentum,
            weight_decay=f.weight_decay, schedule=f.lr_schedule, warmup_epochs=f.warmup_epochs,
            lr_step_epochs=_int_list("lr_step_epochs", f.lr_step_epochs),
            lr_step_factor=f.lr_step_factor, backbone_lr_multiplier=f.backbone_lr_multiplier,
            restart_at_unfreeze=f.lr_restart_at_unfreeze,
            global_clipnorm=f.global_clipnorm, clipnorm=f.clipnorm, clipvalue=f.clipvalue),
        freeze=FreezeConfig(unfreeze_at=f.unfreeze_at, unfreeze_layers=f.unfreeze_layers,
                            freeze_bn=f.freeze_bn),
        loss=LossConfig(loss=_loss_name(f), pos_weight=f.pos_weight or None, focal_gamma=f.focal_gamma,
                        focal_alpha=f.focal_alpha, fbeta=f.fbeta, fbeta_weight=f.fbeta_weight,
                        label_smoothing=f.label_smoothing),
        train=TrainConfig(
            model_dir=f.model_dir, epochs=f.epochs, batch_size=f.batch_size,
            steps_per_epoch=f.steps_per_epoch, steps_per_loop=f.steps_per_loop, seed=f.seed,
            deterministic=f.deterministic, checkpoint_every_steps=f.checkpoint_every_steps,
            keep_checkpoints=f.keep_checkpoints, best_metric=f.best_metric,
            best_mode=f.best_mode, strategy=f.strategy, num_virtual_cpus=f.num_virtual_cpus,
            progress=f.progress, init_checkpoint=f.init_checkpoint or None,
            init_include=tuple(f.init_include), init_exclude=tuple(f.init_exclude),
            allow_partial_restore=f.allow_partial_restore,
            allow_changed=tuple(f.allow_changed), ema_decay=f.ema_decay,
            ema_warmup=f.ema_warmup, eval_with_ema=f.eval_with_ema, export_raw=f.export_raw,
            calibrate_bn_steps=f.calibrate_bn_steps, ema_calibrate_bn=f.ema_calibrate_bn,
            export_from=f.export_from, threshold_objective=f.threshold_objective,
            mixed_precision=f.mixed_precision, jit_compile=f.jit_compile,
            max_bad_steps=f.max_bad_steps, max_rollbacks=f.max_rollbacks,
            bad_step_lr_factor=f.bad_step_lr_factor, max_loss_ratio=f.max_loss_ratio,
            summary_every=f.summary_every,
            histogram_every=f.histogram_every, image_every=f.image_every,
            early_stop_patience=f.early_stop_patience, plateau_patience=f.plateau_patience,
            plateau_factor=f.plateau_factor),
        benchmark=BenchmarkConfig(window_s=f.benchmark_window_s, windows=f.benchmark_windows,
                                  input=f.benchmark_input, compare=f.benchmark_compare or "none"),
    ).validated()


# Flags that choose what to do with a run rather than describe it. flags.txt
# leaves them out: absl lets the later of two values win, and a flagfile's
# --mode=train would otherwise override the --mode=eval typed before
# --flagfile (and a saved --overwrite would wipe the run on the next use).
NOT_SAVED = ("mode", "overwrite", "allow_changed", "export_from", "export_raw",
             "benchmark_window_s", "benchmark_windows", "benchmark_input", "benchmark_compare")


def effective_flags(f=flags.FLAGS) -> str:
    """This module's flags as a flagfile: `--flagfile=<it>` repeats the run (in any --mode)."""
    return "\n".join(flag.serialize() for flag in f.get_flags_for_module(__name__)
                     if flag.name not in _ALIASES and flag.name not in NOT_SAVED) + "\n"
