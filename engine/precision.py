"""Mixed precision for the custom loop: the Keras policy while the model is built, and
dynamic loss scaling for float16.

Why our own loss scale and not keras.optimizers.LossScaleOptimizer: that
wrapper scales, unscales and skips inside one optimizer's `apply`, but this
engine has one optimizer per parameter group, sums gradients across replicas
by hand before clipping, and already skips non-finite steps for every
precision (steps.py). What float16 adds is only the scale: the loss is
multiplied by it before `tape.gradient`, the replica-summed gradients are
divided by it, and a step whose gradients overflow float16 is skipped by the
same guard. The scale halves at each such overflow and doubles after
`growth_interval` finite steps in a row (TensorFlow's and Keras' defaults:
start at 2^15, interval 2000).

An overflow while the scale is above its minimum (1) is the expected price of
the search for the largest safe scale, not a sign of divergence: it is counted
in `overflow_steps`, not as a bad step, so it never triggers a rollback. At
the minimum scale a non-finite step is a bad step like in float32.

bfloat16 has float32's exponent range and needs no scaling.
"""
from __future__ import annotations

import contextlib
from typing import Dict

import keras
import tensorflow as tf

POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


@contextlib.contextmanager
def policy_scope(precision: str):
    """Keras' global dtype policy for `precision` while models are built, then the old one.

    Layers take the policy when they are created, so building inside this
    scope is enough; nothing global stays changed for the caller.
    """
    previous = keras.config.dtype_policy()
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _variable(value, dtype, name):
    return tf.Variable(value, trainable=False, dtype=dtype, name=name,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


class DynamicLossScale:
    """The loss scale and its counters; create under strategy.scope()."""

    def __init__(self, initial: float = 2.0 ** 15, growth_interval: int = 2000,
                 factor: float = 2.0, minimum: float = 1.0):
        self.growth_interval = int(growth_interval)
        self.factor = float(factor)
        self.minimum = float(minimum)
        self.scale = _variable(initial, tf.float32, "loss_scale")
        self.good_steps = _variable(0, tf.int64, "loss_scale_good_steps")
        self.overflow_steps = _variable(0, tf.int64, "overflow_steps")

    def state(self) -> Dict[str, tf.Variable]:
        return {"loss_scale": self.scale, "loss_scale_good_steps": self.good_steps,
                "overflow_steps": self.overflow_steps}

    def is_overflow(self, finite) -> tf.Tensor:
        """A non-finite step that a smaller scale may cure (read before update)."""
        return tf.logical_and(tf.logical_not(finite), self.scale > self.minimum)

    def update(self, finite) -> None:
        """Cross-replica, once per step, after the step's gradients were judged."""
        overflow = self.is_overflow(finite)
        grow = tf.logical_and(finite, self.good_steps + 1 >= self.growth_interval)
        shrunk = tf.maximum(self.scale / self.factor, self.minimum)
        self.scale.assign(tf.where(finite, tf.where(grow, self.scale * self.factor, self.scale),
                                   shrunk))
        self.good_steps.assign(tf.where(tf.logical_and(finite, tf.logical_not(grow)),
                                        self.good_steps + 1, tf.constant(0, tf.int64)))
        self.overflow_steps.assign_add(tf.cast(overflow, tf.int64))
