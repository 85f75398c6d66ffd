"""Training health: the non-finite guard's state, in-graph summaries, a diagnosis.

The guard itself lives in the traced step (steps.py): after the all-reduce
every replica holds the same summed gradients and the same global loss, so
all agree on `ok = isfinite(loss) and all(isfinite(grads))`; the optimizers,
the EMA update and the BatchNorm moving statistics change only when ok. This
module holds what the step and the trainer share about it:

* StepGuard: the counters (total bad steps, bad steps in a row; keyed
  train/bad_steps and train/consecutive_bad_steps in the checkpoint) and a
  copy of the last bad batch, so a run that gives up can replay it.
* StepSummaries: TensorBoard summaries written from inside the traced step
  under a `step % every == 0` condition, so nothing retraces and the graph
  does not grow however many are written. TF 2.21 has no tensorboard
  package (tf.summary.scalar/histogram/image raise), so everything goes
  through core `tf.summary.write` with the plugin metadata TensorBoard reads.
* diagnose(): one eager forward/backward pass on the bad batch that names
  the first layer whose activation (or, walking back from the loss, whose
  gradient) is not finite.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from engine.variables import as_tf_variable


class TrainingDiverged(ValueError):
    """The run gave up on non-finite steps; the message names where they come from."""


def _counter(name):
    return tf.Variable(0, name=name, trainable=False, dtype=tf.int64,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


class StepGuard:
    """Counters of non-finite steps, and the last bad batch.

    Create under strategy.scope(). With batch_spec (or keep_batches) it
    keeps a copy of the last bad batch (written only on bad steps) for
    diagnose(). The copy is not part of the checkpoint: it only serves the
    diagnosis of the process that saw it.
    """

    def __init__(self, batch_spec=None):
        self.bad_steps = _counter("bad_steps")
        self.consecutive = _counter("consecutive_bad_steps")
        self.bad_batch = None
        if batch_spec is not None:
            self.keep_batches(batch_spec)

    def keep_batches(self, batch_spec) -> None:
        """Makes the copy of the last bad batch (once; before the step is traced).

        batch_spec: the (images, labels) element_spec of one worker's batches,
        with a static batch size. Call under strategy.scope().
        """
        if self.bad_batch is not None:
            return
        if not all(s.shape.is_fully_defined() for s in batch_spec):
            return  # only known-size batches can be kept
        # Assigned (in the loop's cross-replica part) only on bad steps.
        self.bad_batch = tuple(
            tf.Variable(tf.zeros(s.shape, s.dtype), trainable=False, name=name,
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            for s, name in zip(batch_spec, ("bad_images", "bad_labels")))

    def state(self) -> Dict[str, tf.Variable]:
        return {"bad_steps": self.bad_steps, "consecutive_bad_steps": self.consecutive}

    def record(self, ok, batch: Callable[[], Sequence]):
        """Cross-replica, once per step: count, and keep the batch when bad.

        batch() returns the worker's (images, labels); it is called only
        inside the bad-step branch, because putting the replicas' slices back
        together copies them to the host, which a good step should not pay.
        """
        bad = tf.cast(tf.logical_not(ok), tf.int64)
        self.bad_steps.assign_add(bad)
        self.consecutive.assign(tf.where(ok, tf.constant(0, tf.int64), self.consecutive + 1))
        if self.bad_batch is not None:
            store_images, store_labels = self.bad_batch

            def keep():
                images, labels = batch()
                store_images.assign(images)
                store_labels.assign(labels)
                return tf.constant(True)

            tf.cond(ok, lambda: tf.constant(False), keep)


def all_finite(tensors: Sequence) -> tf.Tensor:
    """True when every element of every (float) tensor is finite."""
    checks = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors if t.dtype.is_floating]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def make_state_check(variables: Sequence) -> Callable[[], bool]:
    """A function telling whether all floating-point state is finite (before a save)."""
    floats = [v for v in variables if tf.as_dtype(v.dtype).is_floating]

    @tf.function
    def check():
        return all_finite([tf.convert_to_tensor(v) for v in floats])

    def finite() -> bool:
        return bool(check().numpy())

    return finite


def first_non_finite(named: Dict[str, object]) -> Optional[str]:
    """The first key whose value holds a NaN or an infinity (host side)."""
    for key, value in named.items():
        array = np.asarray(value)
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            return key
    return None


# ------------------------------------------------------------ summaries
def _metadata(plugin: str, data_class: int) -> bytes:
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin),
        data_class=data_class).SerializeToString()


SCALAR = _metadata("scalars", summary_pb2.DATA_CLASS_SCALAR)
HISTOGRAM = _metadata("histograms", summary_pb2.DATA_CLASS_TENSOR)
IMAGE = _metadata("images", summary_pb2.DATA_CLASS_BLOB_SEQUENCE)
TEXT = _metadata("text", summary_pb2.DATA_CLASS_TENSOR)
BUCKETS = 30


def histogram_buckets(values, k: int = BUCKETS) -> tf.Tensor:
    """TensorBoard's histogram format: [k, 3] float64 rows (left edge, right edge, count).

    Non-finite values are left out (they have no bucket); with a single
    distinct value all edges are that value and the last bucket holds it all,
    as TensorBoard's own histogram summary does.
    """
    x = tf.reshape(tf.cast(values, tf.float64), [-1])
    x = tf.boolean_mask(x, tf.math.is_finite(x))
    n = tf.size(x)

    def some():
        lo, hi = tf.reduce_min(x), tf.reduce_max(x)

        def spread():
            width = (hi - lo) / k
            index = tf.minimum(tf.cast(tf.floor((x - lo) / width), tf.int32), k - 1)
            counts = tf.math.unsorted_segment_sum(tf.ones_like(x), index, k)
            left = lo + tf.range(k, dtype=tf.float64) * width
            return tf.stack([left, left + width, counts], axis=1)

        def single():
            edges = tf.fill([k], lo)
            counts = tf.concat([tf.zeros([k - 1], tf.float64), [tf.cast(n, tf.float64)]], 0)
            return tf.stack([edges, edges, counts], axis=1)

        return tf.cond(hi > lo, spread, single)

    return tf.cond(n > 0, some, lambda: tf.zeros([k, 3], tf.float64))


def _prediction_panel(image, probs, truth, strip_height: int):
    """The image with a strip of one bar per label under it.

    Bar height = predicted probability; green where the label is true, red
    where it is not; dark background.
    """
    size = tf.shape(image)[1]
    rows = tf.cast(tf.range(strip_height), tf.float32)
    threshold = (strip_height - rows - 0.5) / strip_height  # top row needs p ~ 1
    lit = probs[None, :] >= threshold[:, None]  # [H, L]
    colour = tf.where(truth[:, None] > 0.5, tf.constant([[40.0, 200.0, 40.0]]),
                      tf.constant([[220.0, 50.0, 50.0]]))  # [L, 3]
    strip = tf.where(lit[..., None], colour[None], tf.constant(30.0))
    strip = tf.image.resize(strip, [strip_height, size], method="nearest")
    panel = tf.concat([tf.clip_by_value(image, 0.0, 255.0), strip], axis=0)
    return tf.cast(tf.round(panel), tf.uint8)


class StepSummaries:
    """Summaries written from inside the traced train step.

    every: scalars (loss, learning rates, global and per-layer gradient
    norms, bad steps); histogram_every: weights and gradients; image_every:
    up to max_images input images with their predictions (bars) and a text
    table of predicted vs. true labels. 0 turns a kind off (its ops are then
    not even traced). Call write() in the cross-replica part of the loop,
    with a default summary writer set while the step is traced and called.
    """

    def __init__(self, *, keys: Dict[int, str], every: int = 0, histogram_every: int = 0,
                 image_every: int = 0, label_names: Sequence[str] = (),
                 multiclass: bool = False, max_images: int = 3):
        self.keys = keys
        self.every, self.histogram_every, self.image_every = every, histogram_every, image_every
        self.label_names = list(label_names)
        self.multiclass = multiclass
        self.max_images = max_images

    @property
    def enabled(self) -> bool:
        return bool(self.every or self.histogram_every or self.image_every)

    def _key(self, v) -> str:
        return self.keys.get(id(v), getattr(v, "path", None) or v.name.split(":")[0])

    @staticmethod
    def _when(step, every: int, fn: Callable[[], None]) -> None:
        def write():
            fn()
            return tf.constant(True)

        tf.cond(tf.equal(step % every, 0), write, lambda: tf.constant(False))

    def write(self, *, step, loss, norm, grads: List, variables: List,
              learning_rates: Dict[str, Callable], bad_steps, images=None, labels=None,
              logits=None) -> None:
        step = tf.cast(step, tf.int64)
        if self.every:
            self._when(step, self.every, lambda: self._scalars(
                step, loss, norm, grads, variables, learning_rates, bad_steps))
        if self.histogram_every:
            self._when(step, self.histogram_every,
                       lambda: self._histograms(step, grads, variables))
        if self.image_every and logits is not None:
            self._when(step, self.image_every,
                       lambda: self._images(step, images, labels, logits))

    @staticmethod
    def _plain_pngs(images):
        pngs = tf.map_fn(lambda a: tf.io.encode_png(tf.cast(tf.round(tf.clip_by_value(
            a, 0.0, 255.0)), tf.uint8)), images, fn_output_signature=tf.string)
        shape = tf.shape(images)
        return tf.concat([tf.stack([tf.strings.as_string(shape[2]),
                                    tf.strings.as_string(shape[1])]), pngs], 0)

    def _scalars(self, step, loss, norm, grads, variables, learning_rates, bad_steps):
        def scalar(tag, value):
            tf.summary.write(tag, lambda: tf.cast(value() if callable(value) else value,
                                                  tf.float32), step=step, metadata=SCALAR)

        scalar("health/loss", loss)
        scalar("health/bad_steps", bad_steps)
        scalar("grad_norm/global", norm)
        for name, lr in learning_rates.items():
            scalar(f"learning_rate/{name}", lr)
        by_layer: Dict[str, List] = {}
        for g, v in zip(grads, variables):
            by_layer.setdefault(self._key(v).rsplit("/", 1)[0], []).append(g)
        for layer, gs in by_layer.items():
            scalar(f"grad_norm/{layer}", lambda gs=gs: tf.linalg.global_norm(gs))

    def _histograms(self, step, grads, variables):
        for g, v in zip(grads, variables):
            key = self._key(v)
            tf.summary.write(f"weights/{key}", lambda v=v: histogram_buckets(tf.convert_to_tensor(v)),
                             step=step, metadata=HISTOGRAM)
            tf.summary.write(f"gradients/{key}", lambda g=g: histogram_buckets(g), step=step,
                             metadata=HISTOGRAM)

    def _images(self, step, images, labels, logits):
        if logits.shape.rank != 2:  # e.g. per-pixel logits: the inputs only
            n = tf.minimum(tf.shape(logits)[0], self.max_images)
            tf.summary.write("inputs/images", lambda: self._plain_pngs(images[:n]), step=step,
                             metadata=IMAGE)
            return
        n = tf.minimum(tf.shape(logits)[0], self.max_images)
        logits = tf.cast(logits[:n], tf.float32)
        probs = tf.nn.softmax(logits) if self.multiclass else tf.sigmoid(logits)
        images, labels = images[:n], tf.cast(labels[:n], tf.float32)
        size = images.shape[1] or 32
        strip = max(6, size // 4)

        def pngs():
            panels = tf.map_fn(lambda a: tf.io.encode_png(_prediction_panel(a[0], a[1], a[2], strip)),
                               (images, probs, labels), fn_output_signature=tf.string)
            shape = tf.shape(images)
            width = tf.strings.as_string(shape[2])
            height = tf.strings.as_string(shape[1] + strip)
            return tf.concat([tf.stack([width, height]), panels], 0)

        tf.summary.write("inputs/predictions", pngs, step=step, metadata=IMAGE)
        if self.label_names:
            names = tf.constant(self.label_names)

            def text():
                def row(a):
                    p, t = a
                    shown = tf.strings.join([names, " (", tf.strings.as_string(p, precision=2), ")"])
                    predicted = tf.strings.reduce_join(tf.boolean_mask(shown, p >= 0.5),
                                                       separator=", ")
                    true = tf.strings.reduce_join(tf.boolean_mask(names, t > 0.5), separator=", ")
                    return tf.strings.join(["| ", predicted, " | ", true, " |"])

                rows = tf.map_fn(row, (probs, labels), fn_output_signature=tf.string)
                return tf.strings.reduce_join(
                    tf.concat([["| predicted (p >= 0.5) | true |", "|---|---|"], rows], 0),
                    separator="\n")

            tf.summary.write("inputs/predictions_text", text, step=step, metadata=TEXT)


# ------------------------------------------------------------ diagnosis
def largest_weight(named: Dict[str, object]) -> str:
    """Names the weight with the largest magnitude: where a finite divergence shows.

    A run whose loss explodes without ever going non-finite leaves no bad
    batch to replay; its weights still tell where the blow-up sits.
    """
    key, top = None, -1.0
    for k, value in named.items():
        value = np.asarray(value)
        if value.dtype.kind != "f" or not value.size:
            continue
        peak = float(np.max(np.abs(value)))
        if peak > top or not np.isfinite(peak):
            key, top = k, peak
            if not np.isfinite(peak):
                break
    if key is None:
        return "no weights to inspect"
    return f"the largest weight is {key} (|w| up to {top:.3g})"


def _leaf_layers(model):
    """(path, layer) of every layer without sublayers, paths as in the state keys."""
    out = []

    def walk(layer, prefix):
        children = list(getattr(layer, "_layers", []))
        if not children and layer is not model:
            out.append((prefix.rstrip("/"), layer))
        for child in children:
            walk(child, f"{prefix}{child.name}/")

    walk(model, "")
    return out


@contextlib.contextmanager
def _recording(leaves, records: List, tape):
    """Temporarily wraps each leaf layer's call to record (path, output) in order."""
    patched = []
    for path, layer in leaves:
        original = layer.call

        def call(*args, __original=original, __path=path, **kwargs):
            out = __original(*args, **kwargs)
            for t in tf.nest.flatten(out):
                if isinstance(t, tf.Tensor) and t.dtype.is_floating:
                    tape.watch(t)
                    records.append((__path, t))
            return out

        object.__setattr__(layer, "call", call)
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")


def _finite(t) -> bool:
    return t is None or bool(np.all(np.isfinite(np.asarray(t))))


def diagnose(model, loss_fn, images, labels, global_batch: int, keys: Dict[int, str]) -> str:
    """Where a batch's step goes non-finite, replayed eagerly with the current weights.

    Checks, in order: the input batch, the weights, each layer's output in
    forward order, the statistics layers write in the forward pass (BN), the
    loss, then the gradients walking back from the loss (the first
    non-finite one met there is where backpropagation broke).
    Returns one line. Changes BatchNorm moving statistics (a training-mode
    pass): call it only when the run is about to stop.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    labels = tf.convert_to_tensor(labels, tf.float32)
    if not _finite(images):
        return "the input batch itself holds non-finite pixel values"
    if not _finite(labels):
        return "the input batch's labels are not finite"
    for v in model.weights:
        if not _finite(v.numpy()):
            return f"weight {keys.get(id(v), v.path)} is not finite"
    records: List = []
    trainable = list(model.trainable_variables)
    with tf.GradientTape(persistent=True) as tape:
        with _recording(_leaf_layers(model), records, tape):
            logits = model(images, training=True)
        per_example = loss_fn(labels, logits)
        loss = tf.reduce_sum(tf.cast(per_example, tf.float32)) / float(global_batch)
    for path, out in records:
        if not _finite(out):
            return f"the activation (output) of layer {path} is the first that is not finite"
    for path, layer in _leaf_layers(model):
        if layer.trainable and any(not _finite(v.numpy()) for v in layer.non_trainable_variables):
            return (f"the statistics that layer {path} keeps (BatchNorm's moving variance) "
                    f"overflow: its inputs are finite but too large")
    if not _finite(loss):
        return "the loss is not finite although every activation is"
    outputs = [t for _, t in records]
    out_grads = tape.gradient(loss, outputs)
    weight_grads = tape.gradient(loss, [as_tf_variable(v) for v in trainable])
    del tape
    layer_of = {}
    for path, layer in _leaf_layers(model):
        for v in layer.trainable_variables:
            layer_of[id(v)] = path
    bad_weights = {layer_of.get(id(v), keys.get(id(v), "?"))
                   for v, g in zip(trainable, weight_grads) if not _finite(g)}
    # Walk back from the loss. The gradient at a layer's output is made by the
    # backward pass of the layer that consumed it (the one walked just before),
    # so a non-finite one there names that consumer; a layer whose own weight
    # gradients are non-finite under a finite output gradient is named itself.
    consumer = None
    for (path, _), g in reversed(list(zip(records, out_grads))):
        if not _finite(g):
            culprit = consumer or path
            return (f"the gradient first turns non-finite in the backward pass of layer "
                    f"{culprit} (walking back from the loss)")
        if path in bad_weights:
            return (f"the gradient of layer {path}'s weights is the first that is not finite "
                    f"(walking back from the loss)")
        consumer = path
    if bad_weights:
        return f"the gradient of layer {sorted(bad_weights)[0]}'s weights is not finite"
    return ("a replay of the last bad batch is finite everywhere (the failure depends on "
            "randomness such as dropout, or on another replica's part of the batch)")
