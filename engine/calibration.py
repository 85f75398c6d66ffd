"""BatchNorm statistics that match the data: "precise BN" by forward passes only.

Why: a frozen backbone runs its BatchNorm layers in inference mode, with
whatever moving statistics it has. A randomly initialised one has mean 0 and
variance 1 everywhere, which fit no real activations: InceptionV3's pooled
features then barely vary across images and the head of a frozen phase sees
a constant (shared/DESIGN.md). EMA weights have the same problem in a
milder form: averaged weights meet averaged statistics that were never
measured with them.

What: N forward passes in training mode over training batches, with no
gradient and no weight update. During the passes every BatchNorm layer runs
with momentum 0, so after each pass its moving statistics hold that batch's
mean and (biased) variance; they are summed on the host and, after the last
pass, each layer gets the average over the N batches (and over the local
replicas): the cumulative average that momentum 1/(i+1) would give, the
standard "precise BN" estimate. Everything the passes touched besides the
moving statistics (BN momentum and `trainable`, dropout seed-generator
state) is put back exactly, so calibration changes nothing but the
statistics and an exact resume is not disturbed.

Under a distribution strategy each replica runs its slice of the worker's
batch (cut on the host, engine/data/replicas.py, as the train step gets its
slices) inside `strategy.run`; with synchronized BN every replica measures the
statistics of the whole batch, without it each measures its own slice, and
the average over replicas is used either way.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, List, Optional

import keras
import numpy as np
import tensorflow as tf

from engine.data.replicas import split_on_host


def batchnorm_layers(model) -> List[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer inside `model`, nested models included, once each."""
    out, seen = [], set()

    def walk(layer):
        for child in getattr(layer, "_layers", []):
            if isinstance(child, keras.layers.BatchNormalization) and id(child) not in seen:
                seen.add(id(child))
                out.append(child)
            walk(child)

    walk(model)
    return out


def training_batches(data, *, steps: int, **dataset_args) -> Iterator:
    """The first `steps` training batches: epoch 0's order, then epoch 1's, ...

    dataset_args go to data.train_dataset (global_batch, input_size, seed,
    augment, shards). The data position of the run is not touched: each
    epoch's order is a pure function of (seed, epoch).
    """
    epoch, left = 0, steps
    while left > 0:
        for images, labels in data.train_dataset(epoch=epoch, **dataset_args):
            yield images, labels
            left -= 1
            if left == 0:
                return
        epoch += 1


class BNCalibrator:
    """Re-estimates every BatchNorm layer's moving statistics of one model.

    The forward pass is traced once per calibrator (the first call), so
    calibrating before each EMA evaluation does not retrace.
    """

    def __init__(self, model, *, strategy=None, local_replicas: int = 1):
        self.model = model
        self.strategy = strategy or tf.distribute.get_strategy()
        self.local_replicas = int(local_replicas)
        self.layers = batchnorm_layers(model)
        for layer in self.layers:
            if getattr(layer, "renorm", False):
                raise ValueError(f"BN calibration does not support batch renormalization "
                                 f"(layer {layer.name})")
        self.statistics = [v for layer in self.layers
                           for v in (layer.moving_mean, layer.moving_variance)]
        # What else a training-mode pass writes: dropout seed-generator state
        # (integer variables), put back afterwards so the run's random stream
        # is the same with and without calibration.
        self._other_state = [v for v in model.variables
                             if not tf.as_dtype(v.dtype).is_floating]
        self._pass = None

    def __call__(self, batches: Iterable, steps: int) -> int:
        """Runs up to `steps` batches (images, labels) from `batches`; returns how many ran.

        Trainable weights are never written. The moving statistics become
        the average of the per-batch statistics; all else comes back as it was.
        """
        if steps <= 0 or not self.layers:
            return 0
        sums: Optional[List[np.ndarray]] = None
        count = 0
        with self._calibration_mode():
            for images, _ in batches:
                if count == steps:
                    break
                values = [np.asarray(v, np.float64) for v in self._forward()(images)]
                sums = values if sums is None else [s + v for s, v in zip(sums, values)]
                count += 1
        if count:
            for variable, total in zip(self.statistics, sums):
                variable.assign((total / count).astype(variable.dtype))
        return count

    @contextlib.contextmanager
    def _calibration_mode(self):
        """BN layers trainable (so training mode updates them) with momentum 0; undone after."""
        saved = [(layer.momentum, layer.trainable) for layer in self.layers]
        other = [np.array(v.numpy()) for v in self._other_state]
        try:
            for layer in self.layers:
                layer.trainable = True
                layer.momentum = 0.0
            yield
        finally:
            for layer, (momentum, trainable) in zip(self.layers, saved):
                layer.momentum = momentum
                layer.trainable = trainable
            for v, value in zip(self._other_state, other):
                v.assign(value)

    def _forward(self):
        """The traced pass: images -> the statistics just written, averaged over local replicas."""
        if self._pass is not None:
            return self._pass
        model, strategy, local = self.model, self.strategy, self.local_replicas
        statistics = self.statistics

        def replica(images):
            model(images, training=True)
            return [tf.identity(v.value if isinstance(v, keras.Variable) else v)
                    for v in statistics]

        @tf.function
        def forward(images):
            out = strategy.run(replica, args=split_on_host(strategy, (images,), local))
            per_replica = [strategy.experimental_local_results(t) for t in out]
            return [tf.add_n(list(r)) / len(r) for r in per_replica]

        self._pass = forward
        return forward


def describe(layers: int, batches: int, batch_size: int, seconds: float, why: str) -> str:
    """The one log line of a calibration."""
    return (f"BN calibration: moving statistics of {layers} BatchNorm layers re-estimated "
            f"over {batches} training batches of {batch_size} (forward passes in training "
            f"mode, no weight update; {why}) in {seconds:.1f} s")

