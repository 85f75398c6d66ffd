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

from engine.variables import as_tf_variable


@tf.function(jit_compile=True)
def _blend(decay, shadows, weights):
    """shadow := decay * shadow + (1 - decay) * weight for each pair, fused by XLA."""
    for shadow, weight in zip(shadows, weights):
        shadow.assign(decay * shadow + (1.0 - decay) * tf.cast(weight, shadow.dtype))


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

        One XLA-compiled function per device updates all averaged weights
        there: XLA fuses each shadow's update into one loop that reads shadow
        and weight once and writes the shadow once (three weight-sized passes).
        The EMA is memory traffic, not arithmetic (inceptionv3: 378 tensors,
        87 MB), so passes are its cost: TF's own kernels need two
        (ResourceApplyProximalGradientDescent with alpha = -(1-d)/d, l2 = -1,
        the kernel before this one: five passes) or more (a subtraction into
        a temporary, then ResourceApplyGradientDescent: six and an
        allocation). Measured on inceptionv3@96's weights (BUILD_NOTES): 13-17
        ms a step against 19-23 for the proximal kernel. Each device's copies
        are updated from that device's own weights, which MirroredStrategy
        keeps equal, so every copy of a shadow gets the same value. Frozen
        weights are not updated at all, so their shadows stay bit-equal; a
        shadow equal to its (changing) weight may move by an ulp (rounding of
        d * s + (1 - d) * w), which changes no average beyond rounding.
        """
        d = self.current_decay()
        shadows = [self.strategy.experimental_local_results(self.shadows[i]) for i in self._active]
        weights = [self.strategy.experimental_local_results(as_tf_variable(self.weights[i]))
                   for i in self._active]
        if shadows:
            for device_shadows, device_weights in zip(zip(*shadows), zip(*weights)):
                with tf.device(device_shadows[0].device):
                    _blend(d, list(device_shadows), list(device_weights))
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
