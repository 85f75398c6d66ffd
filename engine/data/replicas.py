"""Feeding replicas: each replica receives only its own slice of a worker's batch.

Why: the train step used to receive the worker's whole batch and each
replica cut its part inside `strategy.run`. Under MirroredStrategy that slice
op runs on the replica's device, so with N replicas every step copied N
whole batches host -> device, and nothing was prefetched to a device. Here
the slices are cut on the host and only they cross, one batch's bytes per
step in all:

    replica_batches(dataset, strategy)   training: the worker's batches cut into
                                         per-replica batches by tf.data on the host
                                         and prefetched to each replica's device
                                         (the copy overlaps the step before)
    split_on_host(strategy, tensors)     evaluation, BN calibration: one batch, cut on
                                         the host inside the traced function
    whole_batch(strategy, values)        the worker's batch again (a bad step's batch)
    input_bytes(spec, local_replicas)    what crosses host -> device per step, now and
                                         with the old slicing

Replica j of a worker (replica_id_in_sync_group % local replicas) receives
rows [j*b, (j+1)*b) of each worker batch of B = local * b rows, exactly what
the old in-step slice gave it: `Dataset.rebatch(b)` cuts each batch into its
consecutive chunks, and the distributed iterator hands consecutive elements
to the worker's devices in turn (a MultiDeviceIterator, round robin). The
data position stays the engine's own (engine/data/source.py rebuilds each
epoch's dataset at its saved step), so the distributed iterator, which
cannot be checkpointed, never needs to be. The default strategy gets the
dataset itself: one device, nothing to distribute, no machinery to pay for.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import tensorflow as tf

from engine import distribute

# Batches waiting on each replica's device: one, so the next batch's copy
# overlaps the current step without holding more device memory than that.
DEVICE_BUFFER = 1


def replica_batches(dataset, strategy):
    """What a train loop iterates: dataset's worker batches, one slice per replica, on its device.

    dataset: this worker's batches (engine/data/source.py train_dataset, or a
    benchmark's synthetic batch repeated), with a static batch size that the
    worker's replicas divide. The default strategy gets `dataset` back.
    """
    if not distribute.has_replica_devices(strategy):
        return dataset
    per_replica = per_replica_dataset(dataset, distribute.local_replica_count(strategy))
    options = tf.distribute.InputOptions(experimental_fetch_to_device=True,
                                         experimental_per_replica_buffer_size=DEVICE_BUFFER)
    # Each worker's function returns that worker's per-replica batches; the
    # engine shards between workers itself (train_dataset's shard_index).
    return strategy.distribute_datasets_from_function(lambda _context: per_replica,
                                                      options=options)


def per_replica_dataset(dataset, local_replicas: int):
    """dataset's batches of B rows as consecutive batches of B / local_replicas rows (host side)."""
    batch = worker_batch_size(dataset.element_spec)
    if batch % local_replicas:
        raise ValueError(f"a batch of {batch} rows does not split over {local_replicas} "
                         f"replicas")
    if local_replicas == 1:
        return dataset
    return dataset.rebatch(batch // local_replicas, drop_remainder=True)


def worker_batch_size(element_spec) -> int:
    """The static batch size of (images, labels, ...) specs; replicas need it known."""
    sizes = {s.shape[0] for s in tf.nest.flatten(element_spec)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"replicas need batches of one static size, got {element_spec}")
    return int(sizes.pop())


def is_per_replica(value) -> bool:
    """Whether value came from replica_batches under a strategy with devices (not a plain tensor)."""
    return not isinstance(value, (tf.Tensor, np.ndarray))


def whole_batch(strategy, values: Sequence) -> Tuple:
    """The worker's batch put back together from per-replica values (plain tensors pass).

    Joins on the host; meant for rare work (keeping a bad step's batch).
    """
    out = []
    for value in values:
        parts = strategy.experimental_local_results(value)
        out.append(parts[0] if len(parts) == 1 else tf.concat(list(parts), axis=0))
    return tuple(out)


def first_replica(strategy, values: Sequence) -> Tuple:
    """Replica 0's slice of each value: the first rows of the worker's batch (no copy)."""
    return tuple(strategy.experimental_local_results(v)[0] for v in values)


def split_on_host(strategy, tensors: Sequence, local_replicas: int) -> Tuple:
    """Per-replica values of one worker batch, cut on the host (call inside a tf.function).

    The rows are padded with zeros to a multiple of local_replicas (a short
    last batch; cut the padding off the gathered outputs), and replica j
    gets the j-th consecutive part. Only that part is copied to its device
    when the replica function reads it. One replica: the tensors themselves.
    """
    if local_replicas == 1:
        return tuple(tensors)
    with tf.device(host_device(strategy)):
        pad = (-tf.shape(tensors[0])[0]) % local_replicas
        parts = [tf.split(tf.pad(t, [[0, pad]] + [[0, 0]] * (t.shape.rank - 1)),
                          local_replicas, axis=0) for t in tensors]
    return tuple(strategy.experimental_distribute_values_from_function(
        lambda context, p=p: p[context.replica_id_in_sync_group % local_replicas])
        for p in parts)


def host_device(strategy) -> str:
    """The CPU of the worker that holds strategy's first local replica device."""
    spec = tf.DeviceSpec.from_string(distribute.replica_devices(strategy)[0])
    return spec.replace(device_type="CPU", device_index=0).to_string()


def input_bytes(element_spec, local_replicas: int) -> Dict[str, int]:
    """Host -> device bytes per step of one worker, from the specs of its batches.

    per_replica: one replica's slice; per_step: all local replicas' slices
    (one worker batch); old_per_step: what the in-step slicing copied (every
    replica's device received the whole worker batch).
    """
    worker = sum(int(np.prod(s.shape)) * s.dtype.size for s in tf.nest.flatten(element_spec))
    return {"per_replica": worker // local_replicas, "per_step": worker,
            "old_per_step": worker * local_replicas}
