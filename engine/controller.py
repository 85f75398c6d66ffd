"""The training story, top to bottom: restore, then phases of epochs, each epoch
`run_steps` calls then `evaluate`, then the actions.

    parts = build_parts(config)             # engine/parts.py: built once
    controller = Controller(parts)
    controller.train()
      restore (engine/restore.py): resume, warm start or fresh
      for each epoch: enter_phase (freeze/unfreeze + trace the step once)
                      run_epoch: run_steps K at a time from the saved position
                      evaluate; checkpoint and best/ (engine/actions.py)
                      a divergence -> Rollback; a stop request -> a checkpoint, exit 75

The traced step is engine/steps.py. Training health (engine/health.py): a
step whose loss or gradients are not finite changes nothing inside the
traced step and is counted; after --max_bad_steps in a row, a non-finite
state, non-finite eval outputs or a loss over --max_loss_ratio x the
baseline, the run rolls back to the last good state with a lower learning
rate, and stops with a one-line diagnosis once --max_rollbacks are used up.

Where things live: the built parts are `controller.parts` (engine/parts.py:
`controller.parts.model`, `.data`, `.groups`, `.ema`, `.config`, ...), the
loop counters are `controller.parts.counters` (`.global_step`, `.epoch`,
`.bn_calibrated`, ...), and the controller's own objects are its attributes
(`controller.checkpointer`, `.rollback`, `.phase`, `.train_loop`). Nothing is
forwarded: a method reads `p = self.parts` at its top and says `p.model`.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Dict, Optional

import numpy as np
import tensorflow as tf

from engine import freeze, manifest, run_dir
from engine.actions import BNCalibration, Checkpointer, Diverging, LossBound, Rollback, StopVote
from engine.metrics import NonFiniteOutputs
from engine.preemption import Preempted, stopped_before_training
from engine.data.replicas import replica_batches
from engine.restore import restore_run
from engine.steps import make_train_loop


class Controller:
    """The run's story over built parts (see the module docstring).

    ~360 lines, every method under 45: the epoch loop and the per-call host
    checks (bad steps, the loss bound, stop requests, --checkpoint_every_steps)
    read in the order they happen; the actions own everything with state.
    """

    def __init__(self, parts):
        self.parts = parts
        self.checkpointer = Checkpointer(parts)
        self.rollback = Rollback(parts, self.checkpointer)
        self.loss_bound = LossBound(parts.config.train.max_loss_ratio)
        self.stop_vote = StopVote(parts)
        self.bn_calibration = BNCalibration(parts)
        self.phase: Optional[str] = None
        self.train_loop = None  # the traced loop of the current phase
        self.phase_traces: Dict[str, dict] = {}  # phase -> {"count": traces}
        self.resumed_from: Optional[str] = None  # the checkpoint restore() resumed from

    # --------------------------------------------------------------- the story
    def restore(self, *, starting: bool = False) -> str:
        """Resumes, warm starts or starts fresh (engine/restore.py); returns the log line."""
        restored = restore_run(self.parts, starting=starting)
        self.resumed_from = restored.path
        return restored.line

    def train(self, flags_text: Optional[str] = None) -> Dict[str, float]:
        """Trains to --epochs from where model_dir's checkpoints left off.

        flags_text: written to model_dir/flags.txt once restore has taken the
        dir over and the settings were checked, so a refused or failing
        command never replaces the flags of the run in model_dir.
        """
        p = self.parts
        if not self._prepare(flags_text):
            p.log.close()
            return {}
        self.rollback.keep_initial_state()
        try:
            return self._train_epochs()
        finally:
            # Also after a data error or a diverged stop: the starting state is
            # only a rollback target while this process trains.
            self.rollback.drop_initial_state()
            p.log.close()

    def _prepare(self, flags_text: Optional[str]) -> bool:
        """Everything before the first step; False when there is nothing left to train."""
        p = self.parts
        c = p.config
        self._stop_before_training(restored=False)
        os.makedirs(p.model_dir, exist_ok=True)
        self.checkpointer.prepare()
        p.log.line(self.restore(starting=True))
        with self._naming_bad_records("train"):
            line = self.bn_calibration.once()
        if line:
            p.log.line(line)
        if p.is_chief:
            manifest.write(p.model_dir, p.settings)
            if flags_text is not None:
                run_dir.write_atomically(os.path.join(p.model_dir, "flags.txt"), flags_text)
        self._stop_before_training()
        p.evaluation.check_model()  # warnings go to the log through its report callback
        self._describe_data()
        with self._naming_bad_records("val"):
            baseline = p.evaluation.baseline()
        p.log.line("baseline (predict each label's train prevalence): " + "  ".join(
            f"{k}={v:.4f}" for k, v in baseline.items()))
        self.loss_bound.set_baseline(baseline.get("baseline_loss", np.inf))
        stopped = p.callbacks.should_stop_now()
        if stopped:
            p.log.line(stopped + "; nothing left to train")
            return False
        warning = p.phases.warning(c.train.epochs)
        if warning:
            p.log.line(warning)
        self._stop_before_training()
        return True

    def _describe_data(self) -> None:
        p = self.parts
        c, data = p.config, p.data
        p.log.line(f"data: {data.description}; {p.steps_per_epoch} steps/epoch "
                   f"of {c.train.batch_size}; replicas: {p.strategy.num_replicas_in_sync}")
        if c.model.task == "multilabel":
            unused = [name for name, prevalence
                      in zip(p.label_names, np.asarray(data.label_prevalence)) if prevalence == 0]
            if unused:
                p.log.line(
                    f"WARNING: {len(unused)} labels have no positive example in the training "
                    f"split ({', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}): they "
                    f"cannot be learned, and their AUC and F-beta mean nothing; check "
                    f"labels.txt against the data")
        if getattr(data, "bad_records", None):
            p.log.line(f"WARNING: --skip_bad_records left out {data.skipped_records} "
                       f"records: " + "; ".join(data.bad_records))

    def _train_epochs(self) -> Dict[str, float]:
        """The epochs left, each: phase, steps, evaluation, checkpoint (or a rollback)."""
        p = self.parts
        c = p.config
        result: Dict[str, float] = {}
        with p.stop_signals:
            while int(p.counters.epoch.numpy()) < c.train.epochs:
                epoch = int(p.counters.epoch.numpy())
                self.enter_phase(p.phases.phase_for_epoch(epoch).name)
                try:
                    result = {**self.run_epoch(), **self._evaluate_while_training()}
                    stop, lines = p.callbacks.on_epoch_end(result)
                    self._save(result)
                except Diverging as bad:
                    line = self.rollback.roll_back(str(bad))
                    p.log.end_epoch(int(p.counters.epoch.numpy()), {}, summary=False)
                    p.log.line(line)
                    continue
                self._report_epoch(epoch, result, lines)
                if stop:
                    break
        return result

    def _report_epoch(self, epoch: int, result: Dict[str, float], lines) -> None:
        p = self.parts
        p.log.end_epoch(epoch, result)
        for line in lines:
            p.log.line(line)
        step = self._global_step()
        p.log.scalars("train", {k: v for k, v in result.items() if not k.startswith("val")},
                      step)
        p.log.scalars("eval", {**{k: v for k, v in result.items() if k.startswith("val")},
                               **p.evaluation.label_scalars()}, step)

    def _stop_before_training(self, restored: bool = True) -> None:
        """Between setup stages: a stop asked for before the loop runs ends the run here.

        Nothing is being written between stages and nothing trained yet, so
        there is nothing to save (train_main: exit 75).
        """
        requested = self.parts.stop_signals.requested
        if requested:
            raise stopped_before_training(requested, self._global_step() if restored else None)

    # ------------------------------------------------------------- the steps
    def enter_phase(self, phase_name: str) -> None:
        """Applies the phase's trainable set and traces its step, once.

        A resumed run whose checkpoint was saved in the phase before crosses
        the boundary here, as the uninterrupted run did: the EMA first learns
        what that phase trained, so only what starts changing now restarts.
        """
        p = self.parts
        c = p.config
        phase = p.phases.named(phase_name)
        before = p.phases.phase_before(phase, self.phase, int(p.counters.unfrozen.numpy()))
        p.counters.unfrozen.assign(phase.index)
        if phase.name == self.phase:
            return
        switching = before is not None
        if p.ema is not None and switching and self.phase is None:
            freeze.apply_phase(p.model, before.name, thawed=before.thawed,
                               freeze_bn=c.freeze.freeze_bn)
            p.ema.start_phase(freeze.changing_weights(p.model), reset_new=False)
        freeze.apply_phase(p.model, phase.name, thawed=phase.thawed,
                           freeze_bn=c.freeze.freeze_bn)
        trainable = {id(v) for v in p.model.trainable_variables}
        phase_variables = {name: [v for v in g.variables if id(v) in trainable]
                           for name, g in p.groups.items()}
        after_step = None
        if p.ema is not None:
            p.ema.start_phase(freeze.changing_weights(p.model), reset_new=switching)
            after_step = p.ema.update
        self.train_loop, self.phase_traces[phase.name] = make_train_loop(
            model=p.model, loss_fn=p.loss_fn, groups=p.groups,
            phase_variables=phase_variables, strategy=p.strategy,
            global_batch=c.train.batch_size, local_replicas=p.local_replicas,
            global_step=p.counters.global_step, global_clipnorm=c.optimizer.global_clipnorm,
            after_step=after_step, clipnorm=c.optimizer.clipnorm,
            clipvalue=c.optimizer.clipvalue, guard=p.guard, summaries=p.summaries,
            loss_scale=p.loss_scale, jit_compile=c.train.jit_compile)
        self.phase = phase.name
        if switching or phase.frozen:
            p.log.line(f"phase: {phase.name} ({sum(len(v) for v in phase_variables.values())} "
                       f"trainable variables)")

    def feed(self, dataset):
        """What run_steps iterates: dataset's worker batches, one slice per replica.

        Cut on the host and prefetched to each replica's device
        (engine/data/replicas.py); the default strategy iterates dataset itself.
        """
        return replica_batches(dataset, self.parts.strategy)

    def run_steps(self, iterator, num_steps: int):
        """Runs num_steps traced train steps of the current phase from iterator.

        iterator: over feed(dataset). Returns (mean loss of the good steps,
        last global gradient norm) as tensors, with no host sync: the
        benchmark times exactly this.
        """
        return self.train_loop(iterator, tf.constant(num_steps, tf.int32))

    def run_epoch(self) -> Dict[str, float]:
        """Runs the rest of the current epoch, from the saved position on."""
        p = self.parts
        c = p.config
        epoch, start = int(p.counters.epoch.numpy()), int(p.counters.step_in_epoch.numpy())
        iterator = self._epoch_iterator(epoch, start)
        p.log.start_epoch(epoch, c.train.epochs, p.steps_per_epoch, start, self.phase)
        losses, t0, step = [], time.perf_counter(), start
        bad_at_start = int(p.guard.bad_steps.numpy())
        while step < p.steps_per_epoch:
            k = self._steps_in_next_call(step)
            loss, good = self._run_call(iterator, k)
            step += k
            p.counters.step_in_epoch.assign(step)
            if good:
                losses.append((loss, good))  # the mean over the call's good steps
            self._after_call(epoch, step)
        p.counters.epoch.assign_add(1)
        p.counters.step_in_epoch.assign(0)
        return self._epoch_stats(losses, step - start, time.perf_counter() - t0, bad_at_start)

    def _epoch_iterator(self, epoch: int, start: int):
        p = self.parts
        c = p.config
        dataset = p.data.train_dataset(
            epoch=epoch, global_batch=c.train.batch_size // p.num_workers,
            input_size=c.model.input_size, seed=c.train.seed, skip_batches=start,
            augment=c.data.augment, num_shards=p.num_workers, shard_index=p.worker_index)
        with p.strategy.scope():
            p.guard.keep_batches(dataset.element_spec)  # before the step is traced
        return iter(self.feed(dataset))

    def _steps_in_next_call(self, step: int) -> int:
        """--steps_per_loop, cut at the epoch's end and at the next --checkpoint_every_steps."""
        p = self.parts
        t = p.config.train
        k = min(t.steps_per_loop, p.steps_per_epoch - step)
        if t.checkpoint_every_steps:
            every = t.checkpoint_every_steps
            k = min(k, every - self._global_step() % every)
        return k

    def _run_call(self, iterator, k: int):
        """One traced call of k steps, then the host-side checks; returns (loss, good steps)."""
        p = self.parts
        max_bad = p.config.train.max_bad_steps
        tic = time.perf_counter()
        bad_before = int(p.guard.bad_steps.numpy())
        with self._summary_writer(), self._naming_bad_records("train"):
            loss, norm = self.run_steps(iterator, k)
            loss = float(loss)  # one host sync per call
        step = self._global_step()
        bad = int(p.guard.bad_steps.numpy()) - bad_before
        in_a_row = int(p.guard.consecutive.numpy())
        p.evaluation.observe_grad_norm(float(norm), steps=k, step=step)
        rate = k / max(time.perf_counter() - tic, 1e-9)
        p.log.advance(k, loss, rate)
        self._host_summaries(k, rate)
        if max_bad and in_a_row >= max_bad:
            raise Diverging(f"{in_a_row} steps in a row with a non-finite loss, gradient or "
                            f"BN statistic up to step {step}")
        self.loss_bound.check("training loss", loss, step)
        return loss, k - bad

    def _after_call(self, epoch: int, step: int) -> None:
        """A stop request saves and stops here; --checkpoint_every_steps saves here."""
        p = self.parts
        every = p.config.train.checkpoint_every_steps
        requested = self.stop_vote.requested()
        if requested and step < p.steps_per_epoch:
            self.checkpointer.save_rolling()
            p.log.end_epoch(epoch, {}, summary=False)
            raise Preempted(f"stopped by {requested} at step {self._global_step()} "
                            f"(epoch {epoch + 1}, batch {step}); checkpoint saved: run the same "
                            f"command to resume")
        if every and self._global_step() % every == 0 and step < p.steps_per_epoch:
            self.checkpointer.save_rolling()

    def _epoch_stats(self, losses, done: int, seconds: float, bad_at_start: int):
        p = self.parts
        mean_loss = (sum(l * k for l, k in losses) / sum(k for _, k in losses) if losses
                     else float("nan"))
        out = {"loss": mean_loss, "steps_per_sec": done / max(seconds, 1e-9),
               "lr": float(p.schedule(p.counters.global_step) * p.counters.lr_scale)}
        bad_steps = int(p.guard.bad_steps.numpy()) - bad_at_start
        if bad_steps:
            out["bad_steps"] = bad_steps
        if p.loss_scale is not None:
            out["loss_scale"] = float(p.loss_scale.scale.numpy())
        skipped = getattr(p.data, "skipped_records", 0)
        if skipped:
            out["skipped_records"] = skipped
        return out

    def _summary_writer(self):
        """The TensorBoard writer the traced step writes to (chief only)."""
        p = self.parts
        if not (p.log.enabled and p.summaries.enabled):
            return contextlib.nullcontext()
        return p.log.writer("train").as_default()

    def _host_summaries(self, k: int, steps_per_sec: float) -> None:
        """steps/sec, measured on the host, once per --summary_every steps."""
        every = self.parts.config.train.summary_every
        step = self._global_step()
        if every and step // every != (step - k) // every:
            self.parts.log.scalars("train", {"health/steps_per_sec": steps_per_sec}, step)

    # ------------------------------------------------------------------ eval
    def evaluate(self, save: bool = True) -> Dict[str, float]:
        """Validation loss and metrics (and the EMA model's, when EMA is on).

        save: write the searched thresholds to model_dir/thresholds.json
        (False for --mode=eval, which writes nothing into model_dir).
        """
        p = self.parts
        with self._naming_bad_records("val"):
            out = p.evaluation.run("val", save=save and p.is_chief)
            if p.ema is not None and p.config.train.eval_with_ema:
                with p.ema.swapped():  # puts the raw weights and statistics back exactly
                    if p.config.train.ema_calibrate_bn:
                        self.bn_calibration.calibrate(p.config.ema_calibration_steps())
                    # its own thresholds (thresholds_ema.json): export serves the EMA weights
                    out.update(p.evaluation.run("val_ema", save=save and p.is_chief,
                                                weights="ema"))
        return out

    def _evaluate_while_training(self) -> Dict[str, float]:
        """evaluate(), with outputs that diverged handed to Rollback instead of an error."""
        step = self._global_step()
        try:
            out = self.evaluate()
        except NonFiniteOutputs:
            raise Diverging(f"the validation outputs are not finite after step {step}") from None
        for key in ("val_loss", "val_ema_loss"):
            if key in out:
                self.loss_bound.check(key.replace("_", " "), out[key], step)
        return out

    @contextlib.contextmanager
    def _naming_bad_records(self, split: str):
        """Turns a data error met inside a traced call into a DataError naming file and record."""
        try:
            yield
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError,
                tf.errors.NotFoundError) as e:
            explain = getattr(self.parts.data, "explain_error", None)
            error = explain(split, e) if explain is not None else None
            if error is None:
                raise
            raise error from None

    # ----------------------------------------------------------- checkpoints
    def _save(self, result: Dict[str, float]) -> None:
        """The epoch's checkpoints; a stop request that came meanwhile stops here."""
        self.checkpointer.keep_best(result)
        self.checkpointer.save_rolling()
        requested = self.stop_vote.requested()
        if requested:
            epoch = int(self.parts.counters.epoch.numpy())
            raise Preempted(f"stopped by {requested} after epoch {epoch}; "
                            f"checkpoint saved: run the same command to resume")

    def _global_step(self) -> int:
        """The steps trained so far, as a Python int (one host read)."""
        return int(self.parts.counters.global_step.numpy())
