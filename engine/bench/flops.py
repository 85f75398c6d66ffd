"""FLOPs of one train step, and the machine's matmul peak to compare them with.

    graph_flops(fn, *specs)                        FLOPs of fn's traced graph
    train_step_flops(model, loss_fn, images, labels)  {"step": ..., "forward": ...}
    matmul_peak_flops(dtype)                       FLOP/s of the best n x n matmul

flops_per_step: TensorFlow's profiler (tf.compat.v1.profiler,
float_operation) over a traced graph of ONE train step's computation on
the global batch: the forward pass in training mode, the loss, and
tape.gradient with respect to the variables that train in the model's phase,
as replica_forward in engine/steps.py does. So a frozen backbone is counted as
forward of the whole model + backward of the head only (the tape does not
record the frozen backbone), and frozen BatchNorm in inference mode. The
profiler has no FLOP statistics for depthwise-convolution gradients
(MobileNetV2); those are added here at the forward op's cost (2 x output
elements x kernel area). Not counted: the optimizer and EMA updates (a few
element-wise FLOPs per parameter, < 1% here), and ops without FLOP
statistics (BatchNorm, casts). The profiler counts the whole graph as
written, e.g. the first convolution's input gradient that the runtime
prunes (tiny).

The peak: the best 2048 x 2048 matmul (2 n^3 FLOPs, in the policy's compute
dtype; best of 3 after one untimed). On a busy machine the peak reads low:
compare fractions of it from a quiet machine only.
"""
from __future__ import annotations

import math
import time
from typing import Dict

import tensorflow as tf

MATMUL_N, MATMUL_REPEATS = 2048, 3
METHOD = ("tf.compat.v1.profiler float_operation on one traced train step "
          "(forward + loss + gradients of the phase's trainable variables, "
          "global batch; + depthwise-conv gradients); optimizer/EMA updates "
          "not counted")
_DEPTHWISE_GRADS = ("DepthwiseConv2dNativeBackpropInput", "DepthwiseConv2dNativeBackpropFilter")


def graph_flops(fn, *specs) -> int:
    """FLOPs of fn's traced graph: TF's profiler, plus the depthwise-conv gradients it omits."""
    graph = tf.function(fn).get_concrete_function(*specs).graph
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # the profiler uses deprecated TF1 helpers and says so
    try:
        total = tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops
    finally:
        logger.setLevel(level)
    for op in graph.get_operations():
        if op.type not in _DEPTHWISE_GRADS:
            continue
        # As the forward DepthwiseConv2dNative: 2 x output elements x kernel area.
        kernel = op.inputs[1].shape if op.type.endswith("Input") else op.outputs[0].shape
        out_backprop = op.inputs[2].shape
        total += 2 * out_backprop.num_elements() * kernel[0] * kernel[1]
    return int(total)


def train_step_flops(model, loss_fn, images, labels) -> Dict[str, int]:
    """FLOPs of one train step on a batch like (images, labels), in the model's current phase.

    {"step": forward + loss + gradients of what trains now, "forward": forward only}.
    Mirrors replica_forward in engine/steps.py (the tape watches only the
    trainable variables) without the optimizer update; see the module text.
    """
    variables = [v if isinstance(v, tf.Variable) else v.value for v in model.trainable_variables]
    batch = int(images.shape[0])

    def forward(x):
        return model(x, training=True)

    def step(x, y):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            logits = model(x, training=True)
            loss = tf.reduce_sum(loss_fn(y, logits)) / batch
            if model.losses:
                loss += tf.add_n(model.losses)
        return tape.gradient(loss, variables)

    x = tf.TensorSpec(images.shape, images.dtype)
    y = tf.TensorSpec(labels.shape, labels.dtype)
    return {"step": graph_flops(step, x, y), "forward": graph_flops(forward, x)}


def matmul_peak_flops(dtype: str = "float32", n: int = MATMUL_N,
                      repeats: int = MATMUL_REPEATS) -> float:
    """FLOP/s of the fastest of `repeats` n x n matmuls (2 n^3 FLOPs each), after one untimed."""
    a = tf.cast(tf.random.stateless_uniform([n, n], seed=[1, 2]), dtype)
    b = tf.cast(tf.random.stateless_uniform([n, n], seed=[3, 4]), dtype)
    best = math.inf
    for i in range(repeats + 1):
        tic = time.perf_counter()
        c = tf.linalg.matmul(a, b)
        c[0, 0].numpy()  # the result exists
        if i:
            best = min(best, time.perf_counter() - tic)
    return 2.0 * n ** 3 / best
