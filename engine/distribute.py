"""The tf.distribute strategy for a run, chosen from the config.

Virtual CPU devices let a 2-core machine run MirroredStrategy with several
replicas, which is how multi-replica code is tested here. They must be set
before TensorFlow initializes its devices, so this runs first.
"""
from __future__ import annotations

import json
import os

import tensorflow as tf

from engine.config import ConfigError


def split_cpu(num_virtual_cpus: int) -> None:
    """Splits the physical CPU into N logical devices (N >= 2), once per process.

    Tolerates a CPU that is already split into the same N devices (a test
    session splits it once, up front, before TensorFlow initializes devices;
    each Trainer then asks again). A different N after initialization, or a
    split asked for too late, raises ConfigError naming the flag.
    """
    if num_virtual_cpus < 2:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == num_virtual_cpus:
        return
    want = [tf.config.LogicalDeviceConfiguration() for _ in range(num_virtual_cpus)]
    try:
        tf.config.set_logical_device_configuration(cpu, want)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have == num_virtual_cpus:  # initialized split by someone else, same count
            return
        raise ConfigError(
            f"--num_virtual_cpus={num_virtual_cpus}: TensorFlow devices were already "
            f"initialized with {have} CPU device(s)") from None


def make_strategy(name: str, num_virtual_cpus: int = 0):
    """Returns a tf.distribute.Strategy. name: auto, default, one_device, mirrored, multi_worker."""
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError("--strategy=multi_worker needs the TF_CONFIG environment variable")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError:
            raise ConfigError("TF_CONFIG is not valid JSON") from None
        split_cpu(num_virtual_cpus)
        return tf.distribute.MultiWorkerMirroredStrategy()
    split_cpu(num_virtual_cpus)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return mirrored_strategy(devices)


def mirrored_strategy(devices):
    """A MirroredStrategy whose collective keys no earlier strategy of this process used.

    Every MirroredStrategy numbers its collective ops from the same start
    (group 1, instance 100), and TensorFlow remembers each instance's shape
    for the life of the process: a second strategy over the same devices
    (another Trainer, the next test) then aborts with "Shape mismatch in the
    collective instance 100", and every collective after it fails too. TF's
    own tests move the key base before each strategy; this moves it before
    (past a strategy someone made directly) and after (so one made directly
    next does not reuse this one's keys).
    """
    _move_collective_key_base()
    strategy = tf.distribute.MirroredStrategy(list(devices))
    _move_collective_key_base()
    return strategy


def _move_collective_key_base() -> None:
    if hasattr(tf.distribute.MirroredStrategy, "_collective_key_base"):
        tf.distribute.MirroredStrategy._collective_key_base += _COLLECTIVE_KEY_STRIDE


_COLLECTIVE_KEY_STRIDE = 100000


def replica_devices(strategy) -> tuple:
    """The devices of this worker's replicas; () for the default strategy (no devices of its own)."""
    try:
        return tuple(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy
        return ()


def has_replica_devices(strategy) -> bool:
    """False for the default strategy: its one replica reads tensors wherever they are."""
    return bool(replica_devices(strategy))


def local_replica_count(strategy) -> int:
    """Replicas on this worker (equals num_replicas_in_sync except multi-worker)."""
    return len(replica_devices(strategy)) or 1


def worker_info(strategy):
    """(number of workers, this worker's index, is chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 1, 0, True
    workers = len(resolver.cluster_spec().as_dict().get("worker", [])) + len(
        resolver.cluster_spec().as_dict().get("chief", []))
    task_type, task_id = resolver.task_type, resolver.task_id
    index = task_id + (1 if task_type == "worker" and "chief" in resolver.cluster_spec().as_dict() else 0)
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0
                                        and "chief" not in resolver.cluster_spec().as_dict())
    return workers, index, is_chief


def check_global_batch(batch_size: int, strategy) -> None:
    """Raises ConfigError unless --batch_size splits evenly over the replicas.

    Each replica takes batch_size / replicas examples while the loss divides
    by batch_size, so a remainder would be dropped from every step without a
    word (3 replicas of a 16 batch train on 15). Refusing is clearer than
    uneven slices, which would also give replicas different shapes to trace.
    """
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        low = batch_size // replicas * replicas
        raise ConfigError(
            f"--batch_size={batch_size} does not split evenly over {replicas} replicas; "
            f"use a multiple of {replicas} (e.g. {max(low, replicas)} or {low + replicas})")
