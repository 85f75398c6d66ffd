"""An exponential moving average of the model weights, for eval and export.

Shadows are keyed like the checkpoint state (`ema/<model key>`), so they
survive a freeze change and resume exactly. Only variables that change in
the current phase are averaged: a frozen weight's shadow stays bit-equal to
the weight instead of drifting by rounding, and a weight that thaws starts
its average from its current value. Swapping uses saved copies, never
add-and-subtract, so the raw weights come back bit-identical.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Sequence

import numpy as np
import tensorflow as tf


class EMA:
    def __init__(self, weights: Sequence, keys: Dict[int, str], decay: float,
                 warmup: bool, strategy):
        """Call under strategy.scope(). weights: every model weight."""
        self.decay = float(decay)
        self.warmup = warmup
        self.strategy = strategy
        self.weights = list(weights)
        self.shadows = [tf.Variable(w, trainable=False, name="ema",
                                    synchronization=tf.VariableSynchronization.ON_WRITE,
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                        for w in self.weights]
        self.num_updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="ema_updates",
                                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self._keys = [keys[id(w)] for w in self.weights]
        self._active: List[int] = []

    def state(self) -> Dict[str, object]:
        out = {k: s for k, s in zip(self._keys, self.shadows)}
        out["_num_updates"] = self.num_updates
        return out

    def start_phase(self, changing: Sequence, *, reset_new: bool) -> None:
        """Averages only `changing` from now on.

        reset_new: start the average of weights that were not changing before
        from their current value (a phase switch inside a run). A resumed run
        passes False: its restored shadows already hold the averages.
        """
        ids = {id(v) for v in changing}
        previous = set(self._active)
        self._active = [i for i, w in enumerate(self.weights) if id(w) in ids]
        if reset_new:
            for i in self._active:
                if i not in previous:
                    self.shadows[i].assign(self.weights[i])

    def reset(self, only_keys=None) -> None:
        """Shadows := their weights, and the warmup count starts again.

        After anything that sets weights without training them (the prior
        bias, a warm start, a resume whose checkpoint had no shadows), so an
        average never starts from values the model did not have. only_keys:
        the model keys to reset (default: all).
        """
        for key, w, s in zip(self._keys, self.weights, self.shadows):
            if only_keys is None or key in only_keys:
                s.assign(w)
        if only_keys is None or "_num_updates" in only_keys:
            self.num_updates.assign(0)

    def current_decay(self):
        if not self.warmup:
            return tf.constant(self.decay, tf.float32)
        n = tf.cast(self.num_updates, tf.float32)
        return tf.minimum(self.decay, (1.0 + n) / (10.0 + n))

    def update(self) -> None:
        """Cross-replica: shadow := d * shadow + (1 - d) * weight, on every device.

        One TF kernel per weight and no temporary: ResourceApplyProximal-
        GradientDescent computes var := (var - alpha * delta) / (1 + alpha * l2)
        (l1 = 0), and with alpha = -(1 - d) / d, l2 = -1, delta = weight that is
        (shadow + (1 - d) / d * weight) / (1 / d), the average itself. An EMA
        reads and writes every weight each step; the two-kernel form before it
        (a subtraction into a new tensor, then var -= alpha * delta) moved six
        weight-sized passes and allocated one, this moves five and allocates
        none. Rounding: within float32 rounding of the average (the closed-form
        tests hold at 1e-5); a shadow equal to its weight may move by an ulp
        (it is not bit-preserved any more: the division rounds), which changes
        no average beyond rounding. Frozen weights are not updated at all, so
        their shadows stay bit-equal.
        """
        d = self.current_decay()
        # Made once per step, not once per weight: each op in the traced step runs every step.
        alpha, l1, l2 = -(1.0 - d) / d, tf.constant(0.0), tf.constant(-1.0)

        def blend(shadow, weight):
            dtype = shadow.dtype  # float32 shadows: the casts below are no ops
            return tf.raw_ops.ResourceApplyProximalGradientDescent(
                var=shadow.handle, alpha=tf.cast(alpha, dtype), l1=tf.cast(l1, dtype),
                l2=tf.cast(l2, dtype), delta=tf.cast(weight, dtype))

        for i in self._active:
            self.strategy.extended.update(self.shadows[i], blend, args=(self.weights[i],),
                                          group=False)
        self.num_updates.assign_add(1)

    @contextlib.contextmanager
    def swapped(self):
        """Puts the averages into the model; restores the raw weights exactly."""
        raw = [np.array(w.numpy()) for w in self.weights]
        try:
            for w, s in zip(self.weights, self.shadows):
                w.assign(s.numpy() if hasattr(s, "numpy") else s)
            yield
        finally:
            for w, value in zip(self.weights, raw):
                w.assign(value)
