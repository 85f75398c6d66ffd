"""Replica scaling at a fixed per-replica batch: examples/sec, efficiency, host->device bytes.

    python benchmarks/scaling.py --num_virtual_cpus=3               # here: bytes and correctness
    python benchmarks/scaling.py --backbone=resnet50 --input_size=224 --per_replica_batch=64
                                                                    # on a machine with GPUs

For N = 1, 2, ... --max_replicas (default: every GPU, else every virtual CPU)
it builds a Trainer under a MirroredStrategy over the first N devices, with
global batch N x --per_replica_batch, and times its train loop (run_steps,
K steps per call) on one real batch repeated, fed as training feeds it
(Controller.feed: each replica its own slice, cut on the host, prefetched
to its device). The arms' windows are alternated as in --mode=benchmark
(engine/bench/arms.py), so a slow moment on the machine hits every N.

Printed per N: examples/sec (median [min - max] over the windows), scaling
efficiency = examples/sec at N / (N x examples/sec at 1), and the
host-to-device bytes per step, summed over the per-replica input specs of
the fed dataset, next to what the old path copied (every replica's device
received the whole batch: N x the batch). Before timing, each N checks that
replica j's first batch holds rows [j*b, (j+1)*b) of the batch ("rows ok").

Virtual CPUs share the machine's cores, so their examples/sec do not scale
(N replicas split the same 2 cores here): on them the byte counts and the
row check are the point. On GPUs the same script measures real scaling.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile

from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

flags.DEFINE_string("backbone", "tiny_cnn", "Backbone (random init).")
flags.DEFINE_integer("input_size", 32, "Input size.")
flags.DEFINE_integer("per_replica_batch", 16, "Examples per replica per step (fixed).")
flags.DEFINE_integer("max_replicas", 0, "Largest N (0: every GPU, else every CPU device).")
flags.DEFINE_integer("num_virtual_cpus", 0, "Split the CPU into this many devices (no GPUs).")
flags.DEFINE_integer("steps_per_loop", 10, "K, steps per traced call.")
flags.DEFINE_integer("windows", 3, "Alternated windows per N.")
flags.DEFINE_float("window_s", 2.0, "Seconds per window (at least).")
flags.DEFINE_string("cache_dir", "~/.cache/tapeworks", "Where the embedded data set lives.")
FLAGS = flags.FLAGS


def replica_devices():
    """GPUs when there are any, else the (virtual) CPU devices, at most --max_replicas."""
    import tensorflow as tf
    devices = ([d.name for d in tf.config.list_logical_devices("GPU")]
               or [d.name for d in tf.config.list_logical_devices("CPU")])
    return devices[:FLAGS.max_replicas] if FLAGS.max_replicas else devices


def build(n, devices, model_dir):
    """A Trainer over the first n devices, unfrozen, and its synthetic batch (repeated)."""
    import tensorflow as tf
    from engine import distribute, freeze
    from engine.config import Config, DataConfig, ModelConfig, TrainConfig
    from engine.trainer import Trainer
    batch = n * FLAGS.per_replica_batch
    config = Config(
        model=ModelConfig(backbone=FLAGS.backbone, input_size=FLAGS.input_size),
        data=DataConfig(cache_dir=FLAGS.cache_dir),
        train=TrainConfig(batch_size=batch, steps_per_loop=FLAGS.steps_per_loop,
                          model_dir=os.path.join(model_dir, f"n{n}"), progress=False,
                          summary_every=0, strategy="mirrored")).validated()
    trainer = Trainer(config, strategy=distribute.mirrored_strategy(devices[:n]))
    trainer.enter_phase(freeze.UNFROZEN)
    first = next(iter(trainer.parts.data.train_dataset(epoch=0, global_batch=batch,
                                                 input_size=FLAGS.input_size, seed=0)))
    return trainer, first, tf.data.Dataset.from_tensors(first).repeat()


def input_bytes_per_step(trainer, dataset):
    """(bytes per step summed over the fed per-replica specs, the old path's bytes per step)."""
    import numpy as np
    import tensorflow as tf
    from engine.data.replicas import input_bytes
    specs = tf.nest.flatten(trainer.feed(dataset).element_spec, expand_composites=True)
    fed = sum(int(np.prod(s.shape)) * s.dtype.size for s in specs)
    counted = input_bytes(dataset.element_spec, trainer.parts.local_replicas)
    assert fed == counted["per_step"], (fed, counted)
    return fed, counted["old_per_step"]


def rows_ok(trainer, first, dataset) -> bool:
    """Replica j's first fed batch is rows [j*b, (j+1)*b) of the batch, on its own device."""
    import numpy as np
    strategy = trainer.parts.strategy
    images, labels = next(iter(trainer.feed(dataset)))
    b = FLAGS.per_replica_batch
    devices = strategy.extended.worker_devices
    for j, (x, y) in enumerate(zip(strategy.experimental_local_results(images),
                                   strategy.experimental_local_results(labels))):
        if x.device != devices[j] or not (
                np.array_equal(x.numpy(), first[0].numpy()[j * b:(j + 1) * b])
                and np.array_equal(y.numpy(), first[1].numpy()[j * b:(j + 1) * b])):
            return False
    return True


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # not TF's per-trace all-reduce lines
    from engine import distribute
    distribute.split_cpu(FLAGS.num_virtual_cpus)  # before anything initializes the devices
    from engine.bench.arms import SYNTHETIC, EngineArm, alternate, summarize
    devices = replica_devices()
    model_dir = tempfile.mkdtemp(prefix="tapeworks_scaling_")
    arms, facts = [], []
    for n in range(1, len(devices) + 1):
        trainer, first, dataset = build(n, devices, model_dir)
        facts.append((n, rows_ok(trainer, first, dataset), *input_bytes_per_step(trainer, dataset)))
        arms.append(EngineArm(f"replicas={n}", SYNTHETIC, trainer, dataset, FLAGS.steps_per_loop))
    for arm in arms:
        arm.warm_up(FLAGS.window_s)
    alternate(arms, FLAGS.windows, FLAGS.window_s)
    print(f"{FLAGS.backbone} {FLAGS.input_size}px, {FLAGS.per_replica_batch} examples per "
          f"replica, K={FLAGS.steps_per_loop}, {FLAGS.windows} alternated windows of >= "
          f"{FLAGS.window_s} s; devices: {', '.join(d.rsplit('/', 1)[-1] for d in devices)}")
    print(f"{'N':>2} {'batch':>5} {'examples/s median [min - max]':>31} {'efficiency':>10} "
          f"{'H2D bytes/step':>14} {'old path':>10} {'old/new':>7}  rows")
    base = None
    for arm, (n, ok, fed, old) in zip(arms, facts):
        s = summarize([r * n * FLAGS.per_replica_batch for r in arm.rates()])
        base = base or s["median"]
        print(f"{n:>2} {n * FLAGS.per_replica_batch:>5} {s['median']:>13.0f} [{s['min']:>7.0f} - "
              f"{s['max']:>7.0f}] {s['median'] / (n * base):>10.2f} {fed:>14,} {old:>10,} "
              f"{old / fed:>7.1f}  {'ok' if ok else 'WRONG'}")
    cores = statistics.median(c for arm in arms for c in arm.cores_busy)
    print(f"cores busy (median over all windows): {cores:.2f}")
    return 0 if all(ok for _, ok, _, _ in facts) else 1


if __name__ == "__main__":
    app.run(main)
