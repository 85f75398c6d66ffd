"""What happens around the steps: saving, rollback, the divergence bound, the stop vote.

Each action is a small object that owns its own state and is called by the
controller (engine/controller.py) at fixed points, as Orbit's actions are:

* Checkpointer: rolling checkpoints (--keep_checkpoints) and best/ (by
  --best_metric), never a non-finite state, nothing half-written after a
  failed save, a damaged state file repaired before the managers read it.
* Rollback: the last good state (or the run's starting state) with a lower
  learning rate, one step further back each time no save came between, and
  a one-line diagnosis when --max_rollbacks are used up.
* LossBound: a finite but absurd loss is divergence too (--max_loss_ratio).
* StopVote: SIGTERM/SIGINT on any worker stops every worker at the same step.
* BNCalibration: BatchNorm statistics measured on the data once a fresh run
  starts (and for the EMA weights, with --ema_calibrate_bn).

`Diverging` is what the controller raises inside an epoch to hand the
situation to Rollback.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import tensorflow as tf

from engine import run_dir
from engine.calibration import BNCalibrator, describe as describe_calibration, training_batches
from engine.health import TrainingDiverged, diagnose, first_non_finite, largest_weight, \
    make_state_check
from engine.state import checkpoint_is_readable, existing_checkpoints


class Diverging(Exception):
    """Bad steps in a row reached --max_bad_steps, the state or a loss went non-finite or
    absurd: the controller hands this to Rollback."""


class Checkpointer:
    """Rolling checkpoints and best/, of the run's named state."""

    def __init__(self, parts):
        self.parts = parts
        # train/*_best start as NaN ("none yet"): only weights, slots and shadows are checked.
        self._checked_keys = [k for k in parts.state.keys
                              if k.startswith(("model/", "optimizer/", "ema/"))]
        self._state_is_finite = make_state_check([parts.state[k] for k in self._checked_keys])
        self._managers = None  # made on first use (see managers)
        self.after_rolling_save: List[Callable[[], None]] = []

    def managers(self):
        """(rolling, best) checkpoint managers, made on first use.

        A manager reads its directory's state file once, when made (and fails
        on one that is not UTF-8), so prepare() repairs that file first; eval
        and export never make one.
        """
        if self._managers is None:
            directory = self.parts.write_dir()
            self._managers = (
                tf.train.CheckpointManager(self.parts.checkpoint,
                                           os.path.join(directory, "checkpoints"),
                                           max_to_keep=self.parts.config.train.keep_checkpoints),
                tf.train.CheckpointManager(self.parts.checkpoint, os.path.join(directory, "best"),
                                           max_to_keep=1))
        return self._managers

    @property
    def rolling(self) -> tf.train.CheckpointManager:
        return self.managers()[0]

    @property
    def best(self) -> tf.train.CheckpointManager:
        return self.managers()[1]

    def prepare(self) -> None:
        """Deletes what writes cut short by kill -9 or a full disk left (ckpt-N_temp/, temporary
        files: never listed, never read), and rewrites a lost or garbled checkpoint state file
        from the checkpoints on disk, so keep-N rotation knows them again."""
        if not self.parts.is_chief:
            return
        run_dir.remove_leftovers(self.parts.model_dir, is_readable=checkpoint_is_readable)
        for sub in ("checkpoints", "best"):
            run_dir.repair_state_file(os.path.join(self.parts.model_dir, sub))
        self._managers = None  # made again from the repaired state files

    def keep_best(self, result: Dict[str, float]) -> None:
        """Saves into best/ when --best_metric improved."""
        t, best = self.parts.config.train, self.parts.counters.best
        value = result.get(t.best_metric)
        if value is None or not np.isfinite(value):
            return
        old = float(best.numpy())
        if np.isnan(old) or (value < old if t.best_mode == "min" else value > old):
            best.assign(value)
            self.save(self.best)

    def save_rolling(self) -> None:
        self.save(self.rolling)

    def save(self, manager) -> None:
        """Saves the named state, after checking it is finite."""
        step = int(self.parts.counters.global_step.numpy())
        if not self._state_is_finite():
            # The guard keeps non-finite gradients out, but a finite update
            # can still overflow a weight; such a state is never saved.
            key = first_non_finite({k: self.parts.state[k].numpy() for k in self._checked_keys})
            raise Diverging(f"{key} is not finite at step {step} (an update overflowed)")
        try:
            manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError):  # a full disk: leave nothing half-written
            self._remove_failed_save(manager, step)
            raise
        self._drop_worker_copy()
        if manager is self.rolling:
            for hook in self.after_rolling_save:
                hook()

    def _remove_failed_save(self, manager, step: int) -> None:
        """After a failed save: its temp dir, and its checkpoint files if they cannot be read."""
        run_dir.remove_leftovers(self.parts.write_dir(), is_readable=checkpoint_is_readable)
        prefix = os.path.join(manager.directory, f"ckpt-{step}")
        if os.path.exists(prefix + ".index") and not checkpoint_is_readable(prefix):
            run_dir.remove_checkpoint_files(prefix)

    def _drop_worker_copy(self) -> None:
        """A non-chief worker saves too (the save can run collectives), then deletes its copy."""
        where = self.parts.write_dir()
        if not self.parts.is_chief and tf.io.gfile.exists(where):
            tf.io.gfile.rmtree(where)
            try:
                os.rmdir(os.path.dirname(where))  # .workers, once no worker uses it
            except OSError:
                pass


class Rollback:
    """Back to the last good state with a lower learning rate, or a diagnosis and a stop."""

    def __init__(self, parts, checkpointer: Checkpointer):
        self.parts = parts
        self._initial_state: Optional[str] = None  # rollback target before the first checkpoint
        self._since_save = 0  # each rollback without a new checkpoint goes one further back
        checkpointer.after_rolling_save.append(self._saved)

    def _saved(self) -> None:
        self._since_save = 0

    def keep_initial_state(self) -> None:
        """A run that starts without a checkpoint keeps its starting state as the oldest
        rollback target (model_dir/rollback/, deleted when the run ends).

        The first checkpoints of a run with far too high a learning rate can
        already hold finite but useless weights; this is the state known good.
        """
        c = self.parts.config.train
        self.drop_initial_state()  # a killed run's leftover
        if not (c.max_bad_steps and c.max_rollbacks) or existing_checkpoints(
                os.path.join(self.parts.model_dir, "checkpoints")):
            return
        self._initial_state = self.parts.checkpoint.write(
            os.path.join(self._initial_state_dir(), "initial"))

    def _initial_state_dir(self) -> str:
        # Not under a worker's scratch dir, which goes at every save: every
        # worker keeps its copy all run long, so all roll back alike.
        p = self.parts
        return os.path.join(p.model_dir, "rollback" if p.is_chief
                            else f".rollback_worker_{p.worker_index}")

    def drop_initial_state(self) -> None:
        shutil.rmtree(self._initial_state_dir(), ignore_errors=True)
        self._initial_state = None

    def _last_good_state(self) -> Optional[str]:
        """The newest readable checkpoint; one older for each rollback since the last save.

        A checkpoint that was rolled back to and failed again before a newer
        one could be written may hold weights already on their way out (finite
        but huge), so the next rollback goes further back.
        """
        paths = [p for p in existing_checkpoints(os.path.join(self.parts.model_dir, "checkpoints"))
                 if checkpoint_is_readable(p)]
        if self._initial_state is not None:
            paths.append(self._initial_state)
        return paths[min(self._since_save, len(paths) - 1)] if paths else None

    def roll_back(self, why: str) -> str:
        """Restores the last good state with a lower learning rate; returns the log line.

        Raises TrainingDiverged (one line, naming where it went wrong) once
        --max_rollbacks are used up.
        """
        p, c = self.parts, self.parts.config.train
        done = int(p.counters.rollbacks.numpy())
        path = self._last_good_state() if done < c.max_rollbacks else None
        if path is None:
            raise TrainingDiverged(
                f"training diverged: {why}, after {done} rollback(s) (--max_rollbacks="
                f"{c.max_rollbacks}); {self.diagnose()}; try a lower --learning_rate, "
                f"--global_clipnorm, or check the input data")
        lr_scale = float(p.counters.lr_scale.numpy()) * c.bad_step_lr_factor
        bad_steps = int(p.guard.bad_steps.numpy())
        p.state.restore(path)
        self._since_save += 1
        p.counters.lr_scale.assign(lr_scale)
        p.counters.rollbacks.assign(done + 1)
        p.guard.bad_steps.assign(bad_steps)
        p.guard.consecutive.assign(0)
        step = int(p.counters.global_step.numpy())
        return (f"WARNING: {why}; rolled back to {path} (step {step}), "
                f"learning rate x{c.bad_step_lr_factor:g} (now x{lr_scale:.3g} of the "
                f"schedule); rollback {done + 1} of {c.max_rollbacks}")

    def diagnose(self) -> str:
        """One eager forward/backward pass on the last bad batch: where it goes non-finite.

        With no bad batch kept (a finite divergence), or a replay that finds
        nothing, the largest weight says where the blow-up sits.
        """
        p = self.parts
        weights = lambda: largest_weight({p.keys[id(v)]: v.numpy()  # noqa: E731
                                          for v in p.model.weights})
        if p.guard.bad_batch is None or not int(p.guard.bad_steps.numpy()):
            return weights()
        images, labels = (v.numpy() for v in p.guard.bad_batch)
        try:
            found = diagnose(p.model, p.loss_fn, images, labels,
                             p.config.train.batch_size // p.num_workers, p.keys)
        except Exception as e:  # noqa: BLE001 - the diagnosis must not hide the real stop
            found = f"the replay of the last bad batch failed ({type(e).__name__}: {e})"
        if "finite everywhere" in found or "failed" in found:
            found += "; " + weights()
        return found


class LossBound:
    """--max_loss_ratio: a loss far above the prevalence baseline's is divergence, finite or not."""

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.bound = 0.0  # 0: not known yet (or off)

    def set_baseline(self, baseline_loss: float) -> None:
        self.bound = self.ratio * baseline_loss if np.isfinite(baseline_loss) else 0.0

    def check(self, what: str, loss: float, step: int) -> None:
        """Raises Diverging for a non-finite val loss or any loss over the bound.

        A non-finite training loss is the step guard's to count, not this.
        """
        if not np.isfinite(loss) and what != "training loss":
            raise Diverging(f"the {what} is {loss} at step {step}")
        if self.bound and np.isfinite(loss) and loss > self.bound:
            raise Diverging(f"the {what} reached {loss:.3g} at step {step}, over "
                            f"{self.ratio:g}x the prevalence baseline's loss (--max_loss_ratio)")


class StopVote:
    """This worker's stop request (SIGTERM/SIGINT) or, with several workers, any worker's.

    A worker preempted alone must not leave the others waiting in the next
    all-reduce: every worker asks at the same points (after each traced
    call, after each epoch's save), and one scalar all-reduce makes them
    agree, so all save the same step and stop together.
    """

    def __init__(self, parts):
        self.parts = parts
        self._vote = None  # the traced all-reduce, made on first use

    def requested(self) -> Optional[str]:
        mine = self.parts.stop_signals.requested
        if self.parts.num_workers == 1:
            return mine
        if self._vote is None:
            strategy = self.parts.strategy

            @tf.function
            def vote(flag):
                return strategy.reduce(tf.distribute.ReduceOp.SUM,
                                       strategy.run(lambda: tf.identity(flag)), axis=None)

            self._vote = vote
        anyone = float(self._vote(tf.constant(1.0 if mine else 0.0))) > 0
        return mine or ("a stop request on another worker" if anyone else None)


class BNCalibration:
    """BatchNorm statistics from the data (engine/calibration.py), once a run and for EMA.

    A random backbone's statistics (mean 0, variance 1) fit no real
    activations, and a frozen phase runs BN in inference mode on them.
    train/bn_calibrated is checkpoint state, so a resume never redoes it;
    the EMA shadows then start from the calibrated statistics.
    """

    def __init__(self, parts):
        self.parts = parts
        self._calibrator = None  # built on first use: its forward pass is traced once

    def once(self) -> Optional[str]:
        """Calibrates a fresh run before its first phase; returns the log line (None: nothing)."""
        p = self.parts
        if int(p.counters.bn_calibrated.numpy()) != 0:
            return None
        steps = p.config.bn_calibration_steps()
        if steps == 0:
            p.counters.bn_calibrated.assign(-1)
            return None
        done, seconds = self.calibrate(steps)
        p.counters.bn_calibrated.assign(done if done else -1)
        if p.ema is not None:
            p.ema.reset()  # a fresh run: nothing averaged yet
        why = ("--calibrate_bn_steps=auto: random init" if p.config.train.calibrate_bn_steps < 0
               else f"--calibrate_bn_steps={steps}")
        return describe_calibration(len(self._model_calibrator().layers), done,
                                    p.config.train.batch_size, seconds, why)

    def _model_calibrator(self) -> BNCalibrator:
        if self._calibrator is None:
            p = self.parts
            self._calibrator = BNCalibrator(p.model, strategy=p.strategy,
                                            local_replicas=p.local_replicas)
        return self._calibrator

    def calibrate(self, steps: int):
        """(batches run, seconds): the model's BN statistics from the first `steps` training
        batches of epoch 0 (the same batches every time, so EMA evaluations compare)."""
        p, c = self.parts, self.parts.config
        t0 = time.perf_counter()
        batches = training_batches(
            p.data, steps=steps, global_batch=c.train.batch_size // p.num_workers,
            input_size=c.model.input_size, seed=c.train.seed, augment=c.data.augment,
            num_shards=p.num_workers, shard_index=p.worker_index)
        done = self._model_calibrator()(batches, steps)
        return done, time.perf_counter() - t0
