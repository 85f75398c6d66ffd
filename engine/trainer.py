"""The training story, top to bottom: build, restore, then phases of epochs.

    Trainer(config).train()
      build: strategy -> data -> model, optimizer groups, EMA, named state
      restore the newest readable checkpoint (or warm start, or start fresh)
      for each epoch: enter its phase (freeze/unfreeze + trace the step once),
                      run the epoch K steps per call, evaluate, checkpoint

The traced steps live in steps.py, the named state in state.py.

Training health (engine/health.py): a step whose loss or gradients are not
finite changes nothing inside the traced step and is counted; between calls
the trainer checks the count of bad steps in a row. At --max_bad_steps it
rolls back to the newest readable checkpoint (or, before the first one, to
the state this run started from), multiplies `lr_scale` by
--bad_step_lr_factor and goes on; once --max_rollbacks are used up it replays
the last bad batch eagerly and stops with TrainingDiverged naming the first
non-finite layer. Every save first checks that all state is finite, so no
checkpoint holds a non-finite weight.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import shutil
import time
from typing import Callable, Dict, Optional

import keras
import numpy as np
import tensorflow as tf

from engine import distribute, freeze, manifest, precision
from engine.calibration import BNCalibrator, describe as describe_calibration, training_batches
from engine.callbacks import EpochCallbacks
from engine.health import StepGuard, StepSummaries, TrainingDiverged, diagnose, first_non_finite, \
    largest_weight, make_state_check
from engine.config import Config, ConfigError
from engine.data import open_data
from engine.ema import EMA
from engine.losses import make_loss, parse_pos_weight
from engine.evaluation import Evaluation
from engine.metrics import NonFiniteOutputs
from engine.preemption import Preempted, StopSignals
from engine.optimizer import make_param_groups, make_schedule
from engine.state import StateError, TrainingState, checkpoint_is_readable, existing_checkpoints, \
    model_variable_keys
from engine.steps import make_train_loop
from engine.summaries import RunLog
from models import backbone_blocks, build_model


class Trainer:
    def __init__(self, config: Config):
        self.config = config.validated()
        c = self.config
        self.model_dir = os.path.abspath(os.path.expanduser(c.train.model_dir))
        _seed_everything(c.train.seed, c.train.deterministic)
        self.strategy = distribute.make_strategy(c.train.strategy, c.train.num_virtual_cpus)
        self.num_workers, self.worker_index, self.is_chief = distribute.worker_info(self.strategy)
        self.local_replicas = distribute.local_replica_count(self.strategy)
        distribute.check_global_batch(c.train.batch_size, self.strategy)
        if c.train.jit_compile and self.strategy.num_replicas_in_sync > 1:
            raise ConfigError(f"--jit_compile works with one replica only; --strategy="
                              f"{c.train.strategy} runs {self.strategy.num_replicas_in_sync}")
        self.data = open_data(c.data.data_dir, os.path.expanduser(c.data.cache_dir), seed=c.train.seed,
                              task=c.model.task, skip_bad_records=c.data.skip_bad_records)
        self.data.decoded_cache_bytes = c.data.decoded_cache_mb << 20
        self.steps_per_epoch = self.data.steps_per_epoch(c.train.batch_size)
        if c.train.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, c.train.steps_per_epoch)
        self.log = RunLog(self._write_dir(), progress=c.train.progress, enabled=self.is_chief)
        self._build()

    # ---------------------------------------------------------------- build
    def _build(self):
        c = self.config
        with self.strategy.scope(), precision.policy_scope(c.train.mixed_precision):
            self.model = build_model(c.model.backbone, c.model.input_size, self.data.num_labels,
                                     task=c.model.task, weights=c.model.weights,
                                     dropout=c.model.dropout, sync_bn=c.model.sync_bn
                                     and self.strategy.num_replicas_in_sync > 1,
                                     seed=c.train.seed, bn_momentum=c.model.bn_momentum,
                                     seg_model=c.model.seg_model, unet_depth=c.model.unet_depth,
                                     unet_filters=c.model.unet_filters)
            self.keys = model_variable_keys(self.model)
            counter = dict(trainable=False, dtype=tf.int64,
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.global_step = tf.Variable(0, name="global_step", **counter)
            self.epoch = tf.Variable(0, name="epoch", **counter)
            self.step_in_epoch = tf.Variable(0, name="step_in_epoch", **counter)
            self.unfrozen = tf.Variable(0, name="unfrozen", **counter)
            self.lr_scale = tf.Variable(1.0, name="lr_scale", trainable=False,
                                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.best = tf.Variable(np.nan, name="best_metric", trainable=False, dtype=tf.float64)
            self.schedule = make_schedule(c.optimizer, self.steps_per_epoch, c.train.epochs,
                                          unfreeze_at=c.freeze.unfreeze_at)
            self.groups = make_param_groups(
                c.optimizer, freeze.trainable_in_every_phase(self.model), self.keys,
                self.schedule, self.global_step, self.lr_scale)
            self.ema = (EMA(self.model.weights, self.keys, c.train.ema_decay, c.train.ema_warmup,
                            self.strategy) if c.train.ema_decay else None)
            self.guard = StepGuard()
            self.loss_scale = (precision.DynamicLossScale()
                               if c.train.mixed_precision == "float16" else None)
            self.rollbacks = tf.Variable(0, name="rollbacks", **counter)
            # 0: not yet (a fresh run), N > 0: BN statistics calibrated over N
            # batches, -1: not calibrated (off, or a checkpoint from before).
            self.bn_calibrated = tf.Variable(0, name="bn_calibrated", **counter)
            self.callbacks = EpochCallbacks(
                metric=c.train.best_metric, mode=c.train.best_mode, lr_scale=self.lr_scale,
                early_stop_patience=c.train.early_stop_patience,
                plateau_patience=c.train.plateau_patience, plateau_factor=c.train.plateau_factor)
        self.state = TrainingState()
        self.state.add_all("model", {self.keys[id(v)]: v for v in self.model.variables})
        for name, group in self.groups.items():
            self.state.add_all(f"optimizer/{name}", group.state())
        if self.ema is not None:
            self.state.add_all("ema", self.ema.state())
        self.state.add_all("train", {"global_step": self.global_step, "epoch": self.epoch,
                                     "step_in_epoch": self.step_in_epoch,
                                     "unfrozen": self.unfrozen, "lr_scale": self.lr_scale,
                                     "best_metric": self.best, "rollbacks": self.rollbacks,
                                     "bn_calibrated": self.bn_calibrated,
                                     **self.guard.state(), **self.callbacks.state(),
                                     **(self.loss_scale.state() if self.loss_scale else {})})
        self.checkpoint = self.state.checkpoint()
        # train/*_best start as NaN ("none yet"): only weights, slots and shadows are checked.
        self._checked_keys = [k for k in self.state.keys
                              if k.startswith(("model/", "optimizer/", "ema/"))]
        self._state_is_finite = make_state_check([self.state[k] for k in self._checked_keys])
        self._initial_state: Optional[str] = None  # rollback target before the first checkpoint
        self._rollbacks_since_save = 0  # each one without a new checkpoint goes one further back
        self._loss_bound = 0.0  # --max_loss_ratio x the baseline's loss, once train() knows it
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self._write_dir(), "checkpoints"),
            max_to_keep=c.train.keep_checkpoints)
        self.best_manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self._write_dir(), "best"), max_to_keep=1)
        self.loss_fn = make_loss(
            c.loss.loss, num_labels=self.data.num_labels,
            pos_weight=parse_pos_weight(c.loss.pos_weight, self.data.num_labels,
                                        self.data.label_prevalence),
            focal_gamma=c.loss.focal_gamma, focal_alpha=c.loss.focal_alpha, fbeta=c.loss.fbeta,
            fbeta_weight=c.loss.fbeta_weight, label_smoothing=c.loss.label_smoothing,
            task=c.model.task)
        blocks = backbone_blocks(self.model.get_layer("backbone"), c.model.seg_model
                                 if c.model.task == "segmentation" else c.model.backbone)
        self.thawed = freeze.thawed_layer_names(blocks, c.freeze.unfreeze_layers)
        self.phase: Optional[str] = None
        self._bn_calibrator: Optional[BNCalibrator] = None
        self.train_loop = None
        self.phase_traces: Dict[str, dict] = {}  # phase -> {"count": traces}
        self.summaries = StepSummaries(
            keys=self.keys, every=c.train.summary_every, histogram_every=c.train.histogram_every,
            image_every=c.train.image_every, label_names=getattr(self.data, "label_names", ()),
            multiclass=c.model.task == "multiclass")
        self.stop_signals = StopSignals()
        self._stop_vote = None  # several workers: the traced all-reduce that makes them agree
        self.settings = manifest.describe(
            c, label_names=getattr(self.data, "label_names", ()),
            replicas=self.strategy.num_replicas_in_sync, workers=self.num_workers)
        self.evaluation = Evaluation(
            model=self.model, loss_fn=self.loss_fn, strategy=self.strategy,
            local_replicas=self.local_replicas, data=self.data, input_size=c.model.input_size,
            batch_size=c.train.batch_size, fbeta=c.loss.fbeta,
            multiclass=c.model.task == "multiclass", task=c.model.task, report=self.log.line,
            thresholds_path=os.path.join(self.model_dir, "thresholds.json"),
            threshold_objective=c.train.threshold_objective)

    def _write_dir(self) -> str:
        """The chief writes to model_dir; other workers to a scratch place, as TF expects."""
        if self.is_chief:
            return self.model_dir
        return os.path.join(self.model_dir, ".workers", f"worker_{self.worker_index}")

    def _drop_worker_copy(self) -> None:
        """A non-chief worker saves too (the save can run collectives), then deletes its copy."""
        if not self.is_chief and tf.io.gfile.exists(self._write_dir()):
            tf.io.gfile.rmtree(self._write_dir())
            try:
                os.rmdir(os.path.dirname(self._write_dir()))  # .workers, once no worker uses it
            except OSError:
                pass

    # --------------------------------------------------------------- restore
    def restore(self) -> str:
        """Resumes from the newest readable checkpoint, else warm starts, else fresh.

        Returns what happened, as a line for the log.
        """
        c = self.config
        skipped = []
        for path in existing_checkpoints(os.path.join(self.model_dir, "checkpoints")):
            if not checkpoint_is_readable(path):
                skipped.append(path)
                continue
            notes, fresh, fallbacks = self._check_settings()
            report = self.state.restore(path, exclude=fresh, fallbacks=fallbacks)
            lost = [k for k in report.missing + report.shape_mismatch
                    if k.startswith("model/") and not _selected_by(k, fresh)]
            if lost and not c.train.allow_partial_restore:
                raise StateError(
                    f"checkpoint {path} does not fit this model ({len(lost)} model tensors "
                    f"missing or of another shape, e.g. {lost[0]}); use another --model_dir "
                    f"or pass --allow_partial_restore")
            notes += self._start_unrestored_state(report, fresh)
            note = "".join(f"WARNING: checkpoint {p} is unreadable (cut short?); skipped. "
                           for p in skipped)
            return "\n".join(notes + [note + "resumed: " + report.summary()])
        if skipped:
            raise StateError(f"no readable checkpoint in {self.model_dir}/checkpoints "
                             f"({len(skipped)} unreadable)")
        self._init_head_bias_to_prior()
        if self.ema is not None:
            self.ema.reset()  # the shadows start from the weights the run starts from
        if c.train.init_checkpoint:
            report = self._warm_start(c.train.init_checkpoint)
            return "warm start: " + report
        return "fresh start"

    def _calibrate_bn_once(self) -> None:
        """BN statistics from the data before the first phase (--calibrate_bn_steps), once a run.

        A random backbone's statistics (mean 0, variance 1) fit no real
        activations, and a frozen phase runs BN in inference mode on them.
        train/bn_calibrated is checkpoint state, so a resume never redoes it;
        the EMA shadows then start from the calibrated statistics.
        """
        if int(self.bn_calibrated.numpy()) != 0:
            return
        steps = self.config.bn_calibration_steps()
        if steps == 0:
            self.bn_calibrated.assign(-1)
            return
        done, seconds = self._calibrate(steps)
        self.bn_calibrated.assign(done if done else -1)
        if self.ema is not None:
            self.ema.reset()  # a fresh run: nothing averaged yet
        why = ("--calibrate_bn_steps=auto: random init" if self.config.train.calibrate_bn_steps < 0
               else f"--calibrate_bn_steps={steps}")
        self.log.line(describe_calibration(len(self._calibrator().layers), done,
                                           self.config.train.batch_size, seconds, why))

    def _calibrator(self) -> BNCalibrator:
        """Built on first use (its forward pass is traced once, then reused by every EMA eval)."""
        if self._bn_calibrator is None:
            self._bn_calibrator = BNCalibrator(self.model, strategy=self.strategy,
                                               local_replicas=self.local_replicas)
        return self._bn_calibrator

    def _calibrate(self, steps: int):
        """(batches run, seconds): the model's BN statistics from the first `steps` training batches."""
        c = self.config
        t0 = time.perf_counter()
        batches = training_batches(
            self.data, steps=steps, global_batch=c.train.batch_size // self.num_workers,
            input_size=c.model.input_size, seed=c.train.seed, augment=c.data.augment,
            num_shards=self.num_workers, shard_index=self.worker_index)
        done = self._calibrator()(batches, steps)
        return done, time.perf_counter() - t0

    def _check_settings(self):
        """Compares this resume's settings with the model_dir's manifest.

        Returns (lines for the log, key patterns of state that must start
        fresh because the user allowed a change of its meaning, fallback keys
        for a checkpoint of an older naming). Raises ConfigError for a change
        that is not allowed.
        """
        saved = manifest.read(self.model_dir)
        if saved is None:
            return self._legacy_settings()
        lines, allowed = manifest.check(saved, self.settings,
                                        allow_changed=self.config.train.allow_changed,
                                        model_dir=self.model_dir)
        fresh = []
        if "optimizer" in allowed:
            fresh.append("optimizer/*")
        if "labels" in allowed or "task" in allowed:
            fresh += ["model/head/logits/*", "ema/head/logits/*", "optimizer/*/head/logits/*"]
        return lines, fresh, {}

    def _legacy_settings(self):
        """A model_dir from before manifest.json: slot keys had no optimizer kind.

        Its flags.txt says which optimizer wrote the slots; only when that is
        the one requested are they read (under their old keys).
        """
        lines = [f"note: {self.model_dir} has no {manifest.FILENAME} (an older tapeworks); "
                 f"settings cannot be compared with the saved run"]
        old = _flag_in_flagfile(os.path.join(self.model_dir, "flags.txt"), "optimizer")
        kind = self.config.optimizer.name
        if old != kind:
            lines.append(f"optimizer slots start fresh: the checkpoints do not say their "
                         f"optimizer was --optimizer={kind}")
            return lines, [], {}
        fallbacks = {}
        for name, group in self.groups.items():
            prefix = f"optimizer/{name}/"
            for key in group.state():
                fallbacks[prefix + key] = prefix + key[len(kind) + 1:]
        return lines, [], fallbacks

    def _start_unrestored_state(self, report, fresh) -> list:
        """EMA shadows the checkpoint did not have start from the restored weights.

        A shadow keeps its construction value otherwise (EMA turned on for a
        resumed run, or a head that starts fresh): an average of weights the
        run never had. A checkpoint without train/bn_calibrated (written before
        calibration existed) counts as not calibrated, so it is never done mid-run.
        """
        lines = []
        if "train/bn_calibrated" in report.missing:  # a run from before calibration existed
            self.bn_calibrated.assign(-1)
        if fresh and any(k.startswith("model/head/logits/") for k in fresh):
            self._init_head_bias_to_prior()
            lines.append("the head's logits layer starts fresh (--allow_changed)")
        if self.ema is not None:
            missing = {k[len("ema/"):] for k in report.missing + report.excluded
                       if k.startswith("ema/")}
            if missing:
                self.ema.reset(only_keys=missing)
                lines.append(f"EMA: {len(missing)} shadows were not in the checkpoint; they "
                             f"start from the restored weights")
        return lines

    def _labels_without_positives(self) -> list:
        """Label names of labels.txt that no training record carries (multi-label only)."""
        if self.config.model.task != "multilabel":
            return []
        names = getattr(self.data, "label_names", ())
        prevalence = np.asarray(self.data.label_prevalence)
        return [n for n, p in zip(names, prevalence) if p == 0]

    def _init_head_bias_to_prior(self) -> None:
        """Starts each label's logit at its training prevalence.

        With two labels at 90% and most under 10%, a zero bias starts every
        label at p=0.5 and spends the first epochs learning the priors; this
        starts the loss at the prevalence baseline instead.
        """
        if self.config.model.task != "multilabel":
            return
        p = np.clip(self.data.label_prevalence, 1e-4, 1 - 1e-4)
        bias = self.model.get_layer("head").get_layer("logits").bias
        bias.assign(np.log(p / (1 - p)).astype(np.float32))

    def _warm_start(self, path: str) -> str:
        c = self.config
        if path.endswith(".h5"):
            try:
                self.model.load_weights(path, skip_mismatch=True)
            except (ValueError, OSError) as e:
                raise StateError(f"--init_checkpoint={path}: {str(e).splitlines()[0]}") from None
            summary = f"loaded Keras weights from {path}"
        else:
            if os.path.isdir(path):
                path = tf.train.latest_checkpoint(os.path.join(path, "checkpoints")) or \
                       tf.train.latest_checkpoint(path) or path
            report = self.state.restore(path, include=c.train.init_include,
                                        exclude=c.train.init_exclude, only_prefixes=("model/",))
            summary = report.summary()
        if self.ema is not None:
            self.ema.reset()
        return summary

    # ----------------------------------------------------------------- train
    def train(self, started: Optional[Callable[[], None]] = None) -> Dict[str, float]:
        """Restores, then trains to --epochs; returns the last epoch's numbers.

        started: called once the run is known to be valid (config checked,
        model built, checkpoint restored and its settings compared), before
        the run writes anything of its own; train_main writes flags.txt there,
        so a failed command never replaces the flags of the run in model_dir.
        """
        c = self.config
        os.makedirs(self.model_dir, exist_ok=True)
        self._remove_partial_saves()
        self.log.line(self.restore())
        with self._naming_bad_records("train"):
            self._calibrate_bn_once()
        if self.is_chief:
            manifest.write(self.model_dir, self.settings)
        if started is not None:
            started()
        self.evaluation.check_model()  # warnings go to the log through its report callback
        self.log.line(f"data: {self.data.description}; {self.steps_per_epoch} steps/epoch "
                      f"of {c.train.batch_size}; replicas: {self.strategy.num_replicas_in_sync}")
        unused = self._labels_without_positives()
        if unused:
            self.log.line(f"WARNING: {len(unused)} labels have no positive example in the training "
                          f"split ({', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}): "
                          f"they cannot be learned, and their AUC and F-beta mean nothing; "
                          f"check labels.txt against the data")
        if getattr(self.data, "bad_records", None):
            self.log.line(f"WARNING: --skip_bad_records left out {self.data.skipped_records} "
                          f"records: " + "; ".join(self.data.bad_records))
        with self._naming_bad_records("val"):
            baseline = self.evaluation.baseline()
        self.log.line("baseline (predict each label's train prevalence): " + "  ".join(
            f"{k}={v:.4f}" for k, v in baseline.items()))
        self._loss_bound = c.train.max_loss_ratio * baseline.get("baseline_loss", np.inf)
        result: Dict[str, float] = {}
        stopped = self.callbacks.should_stop_now()
        if stopped:
            self.log.line(stopped + "; nothing left to train")
            self.log.close()
            return result
        if c.freeze.unfreeze_at >= c.train.epochs:
            self.log.line(f"WARNING: --unfreeze_at={c.freeze.unfreeze_at} >= --epochs="
                          f"{c.train.epochs}: the backbone stays frozen for the whole run")
        self._keep_initial_state()
        try:
            return self._train_epochs()
        finally:
            # Also after a data error or a diverged stop: the starting state is
            # only a rollback target while this process trains.
            self._drop_initial_state()
            self.log.close()

    def _train_epochs(self) -> Dict[str, float]:
        """The epochs left, each: phase, steps, evaluation, checkpoint (or a rollback)."""
        c = self.config
        result: Dict[str, float] = {}
        with self.stop_signals:
            while int(self.epoch.numpy()) < c.train.epochs:
                epoch = int(self.epoch.numpy())
                self._enter_phase(freeze.phase_for_epoch(epoch, c.freeze.unfreeze_at))
                try:
                    train_stats = self._run_epoch()
                    result = {**train_stats, **self._evaluate_while_training()}
                    stop, lines = self.callbacks.on_epoch_end(result)
                    self._save(result)
                except _BadSteps as bad:
                    self._roll_back(str(bad))
                    continue
                self.log.end_epoch(epoch, result)
                for line in lines:
                    self.log.line(line)
                step = int(self.global_step.numpy())
                self.log.scalars("train", {k: v for k, v in result.items()
                                           if not k.startswith("val")}, step)
                self.log.scalars("eval", {**{k: v for k, v in result.items() if k.startswith("val")},
                                          **self.evaluation.label_scalars()}, step)
                if stop:
                    break
        return result

    def _enter_phase(self, phase: str) -> None:
        """Applies the phase's trainable set and traces its step, once."""
        if phase == self.phase:
            return
        c = self.config
        switching = self.phase is not None
        freeze.apply_phase(self.model, phase, thawed=self.thawed, freeze_bn=c.freeze.freeze_bn)
        trainable = {id(v) for v in self.model.trainable_variables}
        phase_variables = {name: [v for v in g.variables if id(v) in trainable]
                           for name, g in self.groups.items()}
        after_step = None
        if self.ema is not None:
            self.ema.start_phase(_changing_weights(self.model), reset_new=switching)
            after_step = self.ema.update
        self.train_loop, self.phase_traces[phase] = make_train_loop(
            model=self.model, loss_fn=self.loss_fn, groups=self.groups,
            phase_variables=phase_variables, strategy=self.strategy,
            global_batch=c.train.batch_size, local_replicas=self.local_replicas,
            global_step=self.global_step, global_clipnorm=c.optimizer.global_clipnorm,
            after_step=after_step, clipnorm=c.optimizer.clipnorm,
            clipvalue=c.optimizer.clipvalue, guard=self.guard, summaries=self.summaries,
            loss_scale=self.loss_scale, jit_compile=c.train.jit_compile)
        self.phase = phase
        self.unfrozen.assign(int(phase == freeze.UNFROZEN))
        if switching or phase == freeze.FROZEN:
            self.log.line(f"phase: {phase} ({sum(len(v) for v in phase_variables.values())} "
                          f"trainable variables)")

    def _run_epoch(self) -> Dict[str, float]:
        """Runs the rest of the current epoch, from the saved position on."""
        c = self.config
        epoch = int(self.epoch.numpy())
        start = int(self.step_in_epoch.numpy())
        dataset = self.data.train_dataset(
            epoch=epoch, global_batch=c.train.batch_size // self.num_workers,
            input_size=c.model.input_size, seed=c.train.seed, skip_batches=start,
            augment=c.data.augment, num_shards=self.num_workers, shard_index=self.worker_index)
        iterator = iter(dataset)
        with self.strategy.scope():
            self.guard.keep_batches(dataset.element_spec)  # before the step is traced
        self.log.start_epoch(epoch, c.train.epochs, self.steps_per_epoch, start, self.phase)
        losses, t0, done = [], time.perf_counter(), 0
        bad_at_start = int(self.guard.bad_steps.numpy())
        every = c.train.checkpoint_every_steps
        step = start
        while step < self.steps_per_epoch:
            k = min(c.train.steps_per_loop, self.steps_per_epoch - step)
            if every:
                k = min(k, every - int(self.global_step.numpy()) % every)
            tic = time.perf_counter()
            bad_before = int(self.guard.bad_steps.numpy())
            with self._summary_writer(), self._naming_bad_records("train"):
                loss, norm = self.train_loop(iterator, tf.constant(k, tf.int32))
                loss = float(loss)  # one host sync per call
            bad = int(self.guard.bad_steps.numpy()) - bad_before
            in_a_row = int(self.guard.consecutive.numpy())
            self.evaluation.observe_grad_norm(float(norm), steps=k,
                                              step=int(self.global_step.numpy()))
            step += k
            done += k
            self.step_in_epoch.assign(step)
            if k > bad:
                losses.append((loss, k - bad))  # the mean over the call's good steps
            rate = k / max(time.perf_counter() - tic, 1e-9)
            self.log.advance(k, loss, rate)
            self._host_summaries(k, rate)
            if c.train.max_bad_steps and in_a_row >= c.train.max_bad_steps:
                raise _BadSteps(f"{in_a_row} steps in a row with a non-finite loss, gradient or "
                                f"BN statistic up to step {int(self.global_step.numpy())}")
            self._check_loss_bound("training loss", loss)
            requested = self._stop_requested()
            if requested and step < self.steps_per_epoch:
                self._checkpoint(self.manager)
                self.log.end_epoch(epoch, {}, summary=False)
                raise Preempted(f"stopped by {requested} at step "
                                f"{int(self.global_step.numpy())} (epoch {epoch + 1}, batch {step}); "
                                f"checkpoint saved: run the same command to resume")
            if every and int(self.global_step.numpy()) % every == 0 and step < self.steps_per_epoch:
                self._checkpoint(self.manager)
        seconds = time.perf_counter() - t0
        self.epoch.assign_add(1)
        self.step_in_epoch.assign(0)
        mean_loss = (sum(l * k for l, k in losses) / sum(k for _, k in losses) if losses
                     else float("nan"))
        out = {"loss": mean_loss, "steps_per_sec": done / max(seconds, 1e-9),
               "lr": float(self.schedule(self.global_step) * self.lr_scale)}
        bad_steps = int(self.guard.bad_steps.numpy()) - bad_at_start
        if bad_steps:
            out["bad_steps"] = bad_steps
        if self.loss_scale is not None:
            out["loss_scale"] = float(self.loss_scale.scale.numpy())
        skipped = getattr(self.data, "skipped_records", 0)
        if skipped:
            out["skipped_records"] = skipped
        return out

    def _summary_writer(self):
        """The TensorBoard writer the traced step writes to (chief only)."""
        if not (self.log.enabled and self.summaries.enabled):
            return contextlib.nullcontext()
        return self.log._writer("train").as_default()

    def _host_summaries(self, k: int, steps_per_sec: float) -> None:
        """steps/sec, measured on the host, once per --summary_every steps."""
        every = self.config.train.summary_every
        step = int(self.global_step.numpy())
        if every and step // every != (step - k) // every:
            self.log.scalars("train", {"health/steps_per_sec": steps_per_sec}, step)

    # ------------------------------------------------------------------ eval
    def evaluate(self) -> Dict[str, float]:
        """Validation loss and metrics (and the EMA model's, when EMA is on)."""
        with self._naming_bad_records("val"):
            out = self.evaluation.run("val", save=self.is_chief)
            if self.ema is not None and self.config.train.eval_with_ema:
                with self.ema.swapped():
                    if self.config.train.ema_calibrate_bn:  # swapped() puts the raw ones back
                        self._calibrate(self.config.ema_calibration_steps())
                    # its own thresholds (thresholds_ema.json): export serves the EMA weights
                    out.update(self.evaluation.run("val_ema", save=self.is_chief, weights="ema"))
        return out

    def _evaluate_while_training(self) -> Dict[str, float]:
        """evaluate(), with outputs that diverged turned into a rollback instead of an error."""
        try:
            out = self.evaluate()
        except NonFiniteOutputs:
            raise _BadSteps(f"the validation outputs are not finite after step "
                            f"{int(self.global_step.numpy())}") from None
        for key in ("val_loss", "val_ema_loss"):
            if key in out:
                self._check_loss_bound(key.replace("_", " "), out[key])
        return out

    def _check_loss_bound(self, what: str, loss: float) -> None:
        """A non-finite or absurd (finite) loss is divergence: --max_loss_ratio."""
        bound = self._loss_bound
        if not np.isfinite(loss) and what != "training loss":  # the guard counts those
            raise _BadSteps(f"the {what} is {loss} at step {int(self.global_step.numpy())}")
        if bound and np.isfinite(loss) and loss > bound:
            ratio = self.config.train.max_loss_ratio
            raise _BadSteps(f"the {what} reached {loss:.3g} at step "
                            f"{int(self.global_step.numpy())}, over {ratio:g}x the prevalence "
                            f"baseline's loss (--max_loss_ratio)")

    @contextlib.contextmanager
    def _naming_bad_records(self, split: str):
        """Turns a data error met inside a traced call into a DataError naming file and record."""
        try:
            yield
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError,
                tf.errors.NotFoundError) as e:
            explain = getattr(self.data, "explain_error", None)
            error = explain(split, e) if explain is not None else None
            if error is None:
                raise
            raise error from None

    # ----------------------------------------------------------- checkpoints
    def _save(self, result: Dict[str, float]) -> None:
        c = self.config
        value = result.get(c.train.best_metric)
        if value is not None and np.isfinite(value):
            best = float(self.best.numpy())
            better = (np.isnan(best) or (value < best if c.train.best_mode == "min" else value > best))
            if better:
                self.best.assign(value)
                self._checkpoint(self.best_manager)
        self._checkpoint(self.manager)
        requested = self._stop_requested()
        if requested:
            raise Preempted(f"stopped by {requested} after epoch "
                            f"{int(self.epoch.numpy())}; checkpoint saved: run the same "
                            f"command to resume")

    def _stop_requested(self) -> Optional[str]:
        """This worker's stop request (SIGTERM/SIGINT) or, with several workers, any worker's.

        A worker preempted alone must not leave the others waiting in the next
        all-reduce: every worker calls this at the same points (after each
        traced call, after each epoch's save), and one scalar all-reduce makes
        them agree, so all save the same step and stop together.
        """
        mine = self.stop_signals.requested
        if self.num_workers == 1:
            return mine
        if self._stop_vote is None:
            strategy = self.strategy

            @tf.function
            def vote(flag):
                return strategy.reduce(tf.distribute.ReduceOp.SUM,
                                       strategy.run(lambda: tf.identity(flag)), axis=None)

            self._stop_vote = vote
        anyone = float(self._stop_vote(tf.constant(1.0 if mine else 0.0))) > 0
        return mine or ("a stop request on another worker" if anyone else None)

    def _checkpoint(self, manager) -> None:
        if not self._state_is_finite():
            # The guard keeps non-finite gradients out, but a finite update
            # can still overflow a weight; such a state is never saved.
            key = first_non_finite({k: self.state[k].numpy() for k in self._checked_keys})
            raise _BadSteps(f"{key} is not finite at step {int(self.global_step.numpy())} "
                            f"(an update overflowed)")
        manager.save(checkpoint_number=int(self.global_step.numpy()))
        self._drop_worker_copy()
        if manager is self.manager:
            self._rollbacks_since_save = 0

    def _remove_partial_saves(self) -> None:
        """Deletes what a save cut short by kill -9 left: ckpt-N_temp/ (never listed, never read)."""
        if not self.is_chief:
            return
        for sub in ("checkpoints", "best"):
            for path in tf.io.gfile.glob(os.path.join(self.model_dir, sub, "*_temp")):
                tf.io.gfile.rmtree(path)

    # ------------------------------------------------------------- rollback
    def _keep_initial_state(self) -> None:
        """A run that starts without a checkpoint keeps its starting state as the oldest
        rollback target (model_dir/rollback/, deleted when the run ends).

        The first checkpoints of a run with far too high a learning rate can
        already hold finite but useless weights; this is the state known good.
        """
        c = self.config.train
        self._drop_initial_state()  # a killed run's leftover
        if not (c.max_bad_steps and c.max_rollbacks) or existing_checkpoints(
                os.path.join(self.model_dir, "checkpoints")):
            return
        self._initial_state = self.checkpoint.write(
            os.path.join(self._initial_state_dir(), "initial"))

    def _initial_state_dir(self) -> str:
        # Not under a worker's scratch dir, which goes at every save: every
        # worker keeps its copy all run long, so all roll back alike.
        return os.path.join(self.model_dir, "rollback" if self.is_chief
                            else f".rollback_worker_{self.worker_index}")

    def _drop_initial_state(self) -> None:
        shutil.rmtree(self._initial_state_dir(), ignore_errors=True)
        self._initial_state = None

    def _last_good_state(self) -> Optional[str]:
        """The newest readable checkpoint; one older for each rollback since the last save.

        A checkpoint that was rolled back to and failed again before a newer
        one could be written may hold weights already on their way out (finite
        but huge), so the next rollback goes further back.
        """
        paths = [p for p in existing_checkpoints(os.path.join(self.model_dir, "checkpoints"))
                 if checkpoint_is_readable(p)]
        if self._initial_state is not None:
            paths.append(self._initial_state)
        return paths[min(self._rollbacks_since_save, len(paths) - 1)] if paths else None

    def _roll_back(self, why: str) -> None:
        """Restores the last good state with a lower learning rate, or gives up."""
        c = self.config.train
        done = int(self.rollbacks.numpy())
        path = self._last_good_state() if done < c.max_rollbacks else None
        if path is None:
            where = self._diagnose()
            raise TrainingDiverged(
                f"training diverged: {why}, after {done} rollback(s) (--max_rollbacks="
                f"{c.max_rollbacks}); {where}; try a lower --learning_rate, --global_clipnorm, "
                f"or check the input data")
        lr_scale = float(self.lr_scale.numpy()) * c.bad_step_lr_factor
        bad_steps = int(self.guard.bad_steps.numpy())
        self.state.restore(path)
        self._rollbacks_since_save += 1
        self.lr_scale.assign(lr_scale)
        self.rollbacks.assign(done + 1)
        self.guard.bad_steps.assign(bad_steps)
        self.guard.consecutive.assign(0)
        self.log.end_epoch(int(self.epoch.numpy()), {}, summary=False)
        self.log.line(f"WARNING: {why}; rolled back to {path} (step "
                      f"{int(self.global_step.numpy())}), learning rate x{c.bad_step_lr_factor:g} "
                      f"(now x{lr_scale:.3g} of the schedule); rollback {done + 1} of "
                      f"{c.max_rollbacks}")

    def _diagnose(self) -> str:
        """One eager forward/backward pass on the last bad batch: where it goes non-finite."""
        if self.guard.bad_batch is None or not int(self.guard.bad_steps.numpy()):
            return largest_weight({self.keys[id(v)]: v.numpy() for v in self.model.weights})
        images, labels = (v.numpy() for v in self.guard.bad_batch)
        try:
            found = diagnose(self.model, self.loss_fn, images, labels,
                             self.config.train.batch_size // self.num_workers, self.keys)
        except Exception as e:  # noqa: BLE001 - the diagnosis must not hide the real stop
            found = f"the replay of the last bad batch failed ({type(e).__name__}: {e})"
        if "finite everywhere" in found or "failed" in found:
            found += "; " + largest_weight({self.keys[id(v)]: v.numpy() for v in self.model.weights})
        return found


def _selected_by(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _flag_in_flagfile(path: str, name: str) -> Optional[str]:
    """The value of --name in an absl flagfile, or None (no file, no such line)."""
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"--{name}="):
            return line.split("=", 1)[1]
    return None


class _BadSteps(Exception):
    """Internal: bad steps in a row reached --max_bad_steps, or the state went non-finite."""


def _changing_weights(model):
    """Weights that change while training in the current phase.

    Trainable variables, plus BatchNorm moving statistics of BN layers that
    run in training mode (trainable ones).
    """
    changing = list(model.trainable_variables)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            changing += [layer.moving_mean, layer.moving_variance]
    return changing


def _seed_everything(seed: int, deterministic: bool) -> None:
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
