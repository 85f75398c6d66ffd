"""Keras 3 variables and the tf.Variables inside them.

Keras 3 wraps each TensorFlow variable in a `keras.Variable` whose `.value`
is the tf.Variable; a GradientTape, a checkpoint and the raw `ResourceApply*`
kernels want the tf.Variable itself. One function, so every place agrees.
"""
from __future__ import annotations

import tensorflow as tf


def as_tf_variable(variable):
    """The tf.Variable behind a Keras 3 variable (a tf.Variable is returned as is)."""
    if isinstance(variable, tf.Variable):
        return variable
    return getattr(variable, "value", variable)
