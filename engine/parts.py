"""Build, then run: every part of a run made once from its Config.

    parts = build_parts(config)          # strategy, data, model, optimizer groups,
                                         # EMA, named state, loss, evaluation, log
    Controller(parts).train()            # engine/controller.py runs them

Each builder below makes one kind of part from the sub-config it needs, so
a newcomer can see where a setting lands; nothing here trains, restores or
writes into model_dir. A strategy can be passed in (the benchmark compares
strategies side by side) instead of the one --strategy names.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import config as tf_config  # disable_op_determinism

from engine import distribute, freeze, manifest, precision
from engine.callbacks import EpochCallbacks
from engine.config import Config, ConfigError
from engine.data import open_data
from engine.ema import EMA
from engine.evaluation import Evaluation
from engine.health import StepGuard, StepSummaries
from engine.losses import make_loss, parse_pos_weight
from engine.optimizer import make_param_groups, make_schedule
from engine.preemption import StopSignals
from engine.state import TrainingState, model_variable_keys
from engine.summaries import RunLog
from models import backbone_blocks, build_model


class Counters:
    """The `train/*` state of the loop itself: where the run is, and its running verdicts."""

    def __init__(self):
        counter = dict(trainable=False, dtype=tf.int64,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.global_step = tf.Variable(0, name="global_step", **counter)
        self.epoch = tf.Variable(0, name="epoch", **counter)
        self.step_in_epoch = tf.Variable(0, name="step_in_epoch", **counter)
        # The phase's index (freeze.Phase.index; -1: none entered yet); the key
        # predates gradual unfreezing, when it was 0 frozen / 1 unfrozen.
        self.unfrozen = tf.Variable(-1, name="unfrozen", **counter)
        self.rollbacks = tf.Variable(0, name="rollbacks", **counter)
        self.lr_scale = tf.Variable(1.0, name="lr_scale", trainable=False,
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.best = tf.Variable(np.nan, name="best_metric", trainable=False, dtype=tf.float64)
        # 0: not yet (a fresh run), N > 0: BN statistics calibrated over N
        # batches, -1: not calibrated (off, or a checkpoint from before).
        self.bn_calibrated = tf.Variable(0, name="bn_calibrated", **counter)

    def state(self) -> Dict[str, tf.Variable]:
        return {"global_step": self.global_step, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "unfrozen": self.unfrozen,
                "lr_scale": self.lr_scale, "best_metric": self.best, "rollbacks": self.rollbacks,
                "bn_calibrated": self.bn_calibrated}


class RunParts:
    """The built parts of one run, as plain attributes (see build_parts for each one's maker).

    Each part is read where it lives: `parts.model`, `parts.data`, and the
    loop counters under `parts.counters` (`parts.counters.global_step`);
    nothing is forwarded, so an attribute's owner is in its name. A part may
    be replaced before a Controller is made over them (tests hand in data
    with poisoned batches); after that, the actions hold references to them.
    """

    def __init__(self, config: Config):
        self.config = config
        self.model_dir = os.path.abspath(os.path.expanduser(config.train.model_dir))

    def write_dir(self) -> str:
        """The chief writes to model_dir; other workers to a scratch place, as TF expects."""
        if self.is_chief:
            return self.model_dir
        return os.path.join(self.model_dir, ".workers", f"worker_{self.worker_index}")


def build_parts(config: Config, *, strategy=None,
                stop_signals: Optional[StopSignals] = None) -> RunParts:
    """Everything a run needs, built once, in the order each part needs the others."""
    parts = RunParts(config.validated())
    parts.stop_signals = stop_signals or StopSignals()
    seed_everything(config.train.seed, config.train.deterministic)
    _place(parts, strategy)
    _open_data(parts)
    with parts.strategy.scope(), precision.policy_scope(config.train.mixed_precision):
        _build_model(parts)
        _build_training(parts)
    _assemble_state(parts)
    _build_loss_and_evaluation(parts)
    return parts


def _place(parts: RunParts, strategy) -> None:
    """The strategy, this process's place among the workers, and what they allow."""
    t = parts.config.train
    parts.strategy = strategy or distribute.make_strategy(t.strategy, t.num_virtual_cpus)
    parts.stop_signals.reinstall()  # a multi-worker strategy takes SIGTERM for itself
    parts.num_workers, parts.worker_index, parts.is_chief = distribute.worker_info(parts.strategy)
    parts.local_replicas = distribute.local_replica_count(parts.strategy)
    distribute.check_global_batch(t.batch_size, parts.strategy)
    if t.jit_compile and parts.strategy.num_replicas_in_sync > 1:
        raise ConfigError(f"--jit_compile works with one replica only; --strategy="
                          f"{t.strategy} runs {parts.strategy.num_replicas_in_sync}")


def _open_data(parts: RunParts) -> None:
    c = parts.config
    parts.data = open_data(c.data.data_dir, os.path.expanduser(c.data.cache_dir),
                           seed=c.train.seed, task=c.model.task,
                           skip_bad_records=c.data.skip_bad_records)
    parts.data.decoded_cache_bytes = c.data.decoded_cache_mb << 20
    parts.steps_per_epoch = parts.data.steps_per_epoch(c.train.batch_size)
    if c.train.steps_per_epoch:
        parts.steps_per_epoch = min(parts.steps_per_epoch, c.train.steps_per_epoch)
    parts.label_names = tuple(getattr(parts.data, "label_names", ()))
    parts.log = RunLog(parts.write_dir(), progress=c.train.progress, enabled=parts.is_chief)


def _build_model(parts: RunParts) -> None:
    """The model, its variables' state keys, and the schedule of what each phase thaws."""
    m, t = parts.config.model, parts.config.train
    parts.model = build_model(m.backbone, m.input_size, parts.data.num_labels, task=m.task,
                              weights=m.weights, dropout=m.dropout,
                              sync_bn=m.sync_bn and parts.strategy.num_replicas_in_sync > 1,
                              seed=t.seed, bn_momentum=m.bn_momentum, seg_model=m.seg_model,
                              unet_depth=m.unet_depth, unet_filters=m.unet_filters)
    parts.keys = model_variable_keys(parts.model)
    parts.blocks = backbone_blocks(parts.model.get_layer("backbone"),
                                   m.seg_model if m.task == "segmentation" else m.backbone)
    parts.phases = freeze.phase_schedule(parts.config.freeze, parts.blocks)


def _build_training(parts: RunParts) -> None:
    """Counters, schedule, optimizer groups, EMA, the step guard, loss scale, callbacks."""
    c = parts.config
    parts.counters = Counters()
    parts.schedule = make_schedule(c.optimizer, parts.steps_per_epoch, c.train.epochs,
                                   unfreeze_at=c.freeze.unfreeze_at)
    # One optimizer per backbone block when blocks need their own learning
    # rate (--layer_lr_decay) or their own Adam step count (several thaws).
    per_block = (parts.blocks if freeze.per_block_groups(parts.phases, c.optimizer.layer_lr_decay)
                 else None)
    parts.groups = make_param_groups(
        c.optimizer, freeze.trainable_in_every_phase(parts.model, per_block), parts.keys,
        parts.schedule, parts.counters.global_step, parts.counters.lr_scale,
        block_depths=freeze.block_depths(per_block))
    parts.ema = (EMA(parts.model.weights, parts.keys, c.train.ema_decay, c.train.ema_warmup,
                     parts.strategy) if c.train.ema_decay else None)
    parts.guard = StepGuard()
    parts.loss_scale = (precision.DynamicLossScale()
                        if c.train.mixed_precision == "float16" else None)
    parts.callbacks = EpochCallbacks(
        metric=c.train.best_metric, mode=c.train.best_mode, lr_scale=parts.counters.lr_scale,
        early_stop_patience=c.train.early_stop_patience,
        plateau_patience=c.train.plateau_patience, plateau_factor=c.train.plateau_factor)


def _assemble_state(parts: RunParts) -> None:
    """Every piece of training state under its key (engine/state.py), and its checkpoint."""
    state = TrainingState()
    state.add_all("model", {parts.keys[id(v)]: v for v in parts.model.variables})
    for name, group in parts.groups.items():
        state.add_all(f"optimizer/{name}", group.state())
    if parts.ema is not None:
        state.add_all("ema", parts.ema.state())
    state.add_all("train", {**parts.counters.state(), **parts.guard.state(),
                            **parts.callbacks.state(),
                            **(parts.loss_scale.state() if parts.loss_scale else {})})
    parts.state = state
    parts.checkpoint = state.checkpoint()
    parts.settings = manifest.describe(parts.config, label_names=parts.label_names,
                                       replicas=parts.strategy.num_replicas_in_sync,
                                       workers=parts.num_workers)


def _build_loss_and_evaluation(parts: RunParts) -> None:
    c = parts.config
    lo, task = c.loss, c.model.task
    parts.loss_fn = make_loss(
        lo.loss, num_labels=parts.data.num_labels,
        pos_weight=parse_pos_weight(lo.pos_weight, parts.data.num_labels,
                                    parts.data.label_prevalence),
        focal_gamma=lo.focal_gamma, focal_alpha=lo.focal_alpha, fbeta=lo.fbeta,
        fbeta_weight=lo.fbeta_weight, label_smoothing=lo.label_smoothing, task=task)
    parts.summaries = StepSummaries(
        keys=parts.keys, every=c.train.summary_every, histogram_every=c.train.histogram_every,
        image_every=c.train.image_every, label_names=parts.label_names,
        multiclass=task == "multiclass")
    parts.evaluation = Evaluation(
        model=parts.model, loss_fn=parts.loss_fn, strategy=parts.strategy,
        local_replicas=parts.local_replicas, data=parts.data, input_size=c.model.input_size,
        batch_size=c.train.batch_size, fbeta=lo.fbeta, multiclass=task == "multiclass",
        task=task, report=parts.log.line,
        thresholds_path=os.path.join(parts.model_dir, "thresholds.json"),
        threshold_objective=c.train.threshold_objective)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seeds Python, NumPy and TensorFlow; op determinism exactly as asked.

    Determinism is process-wide in TensorFlow: a run built after a
    deterministic one in the same process (the benchmark's arms, tests)
    would otherwise inherit it, and XLA refuses some ops under it.
    """
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()
