"""The epoch-end callbacks Keras users rely on, as flags, with state that resumes.

Keras' EarlyStopping and ReduceLROnPlateau keep their counters in Python
attributes, so a resumed run forgets how long it has been waiting. Here the
counters are variables in the named state (train/early_stop_wait,
train/early_stop_best, train/plateau_wait, train/plateau_best), saved with
every checkpoint and restored with it. Both watch --best_metric in the
direction of --best_mode (the metric the best checkpoint is chosen by), with
Keras' semantics: an epoch that does not beat the best seen so far adds one
to `wait`; an improvement resets it; early stopping stops when wait reaches
its patience; the plateau reduction multiplies the learning rate (the
trainer's `lr_scale`) by its factor when wait reaches its patience, then
starts waiting again.

The best checkpoint (best/) and the CSV log (metrics.csv) are the other two
Keras callbacks users relied on; they live in the trainer and summaries.py.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import tensorflow as tf


def _var(value, dtype, name):
    return tf.Variable(value, dtype=dtype, trainable=False, name=name,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


class _Watch:
    """Best value and epochs since it improved, as checkpointed variables."""

    def __init__(self, name: str, mode: str):
        self.mode = mode
        self.best = _var(math.nan, tf.float64, f"{name}_best")
        self.wait = _var(0, tf.int64, f"{name}_wait")

    def update(self, value: float) -> bool:
        """Returns True when value improved on the best so far."""
        best = float(self.best.numpy())
        if math.isnan(best) or (value < best if self.mode == "min" else value > best):
            self.best.assign(value)
            self.wait.assign(0)
            return True
        self.wait.assign_add(1)
        return False


class EpochCallbacks:
    """Early stopping and reduce-LR-on-plateau on one metric. Create under strategy.scope()."""

    def __init__(self, *, metric: str, mode: str, lr_scale: tf.Variable,
                 early_stop_patience: int = 0, plateau_patience: int = 0,
                 plateau_factor: float = 0.1):
        self.metric, self.mode, self.lr_scale = metric, mode, lr_scale
        self.early_stop_patience = early_stop_patience
        self.plateau_patience = plateau_patience
        self.plateau_factor = plateau_factor
        self.early = _Watch("early_stop", mode)
        self.plateau = _Watch("plateau", mode)

    def state(self) -> Dict[str, tf.Variable]:
        return {"early_stop_wait": self.early.wait, "early_stop_best": self.early.best,
                "plateau_wait": self.plateau.wait, "plateau_best": self.plateau.best}

    def should_stop_now(self) -> Optional[str]:
        """At the start of a run: a message when a resumed run had already stopped early."""
        if self.early_stop_patience and int(self.early.wait.numpy()) >= self.early_stop_patience:
            return self._stop_message()
        return None

    def _stop_message(self) -> str:
        return (f"early stop: {self.metric} has not improved on {float(self.early.best.numpy()):.4f} "
                f"for {int(self.early.wait.numpy())} epochs (--early_stop_patience="
                f"{self.early_stop_patience})")

    def on_epoch_end(self, result: Dict[str, float]) -> tuple:
        """Updates the counters from one epoch's result.

        Returns (stop: bool, lines: list of log lines). A missing or
        non-finite metric counts as no improvement.
        """
        lines: List[str] = []
        value = result.get(self.metric)
        finite = value is not None and math.isfinite(value)
        stop = False
        if self.plateau_patience:
            improved = self.plateau.update(value) if finite else self._no_improvement(self.plateau)
            if not improved and int(self.plateau.wait.numpy()) >= self.plateau_patience:
                self.lr_scale.assign(float(self.lr_scale.numpy()) * self.plateau_factor)
                self.plateau.wait.assign(0)
                lines.append(f"plateau: {self.metric} has not improved for {self.plateau_patience} "
                             f"epochs; learning rate x{self.plateau_factor:g} (now x"
                             f"{float(self.lr_scale.numpy()):.3g} of the schedule)")
        if self.early_stop_patience:
            if not (self.early.update(value) if finite else self._no_improvement(self.early)):
                if int(self.early.wait.numpy()) >= self.early_stop_patience:
                    stop = True
                    lines.append(self._stop_message())
        return stop, lines

    @staticmethod
    def _no_improvement(watch: _Watch) -> bool:
        watch.wait.assign_add(1)
        return False
