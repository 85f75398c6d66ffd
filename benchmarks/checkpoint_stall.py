"""How long a checkpoint save stalls training, sync vs TF's async option.

    python benchmarks/checkpoint_stall.py --backbone=inceptionv3 --repeats=4

Stall = wall time from the end of a train call to the end of the next train
call minus that call's own duration measured without a save, so an async save
that only blocks the next step is charged for it. Sync and async saves are
alternated in one process so machine noise hits both alike.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from engine import freeze  # noqa: E402
from engine.config import DEFAULT_INPUT_SIZE, Config, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

flags.DEFINE_string("backbone", "inceptionv3", "Backbone to save.")
flags.DEFINE_integer("repeats", 4, "Saves of each kind.")
flags.DEFINE_integer("batch_size", 16, "Batch of the train step between saves.")
flags.DEFINE_string("cache_dir", "~/.cache/tapeworks", "Embedded dataset cache.")
FLAGS = flags.FLAGS


def main(_):
    model_dir = tempfile.mkdtemp()
    config = Config(model=ModelConfig(backbone=FLAGS.backbone,
                                      input_size=DEFAULT_INPUT_SIZE[FLAGS.backbone]),
                    data=DataConfig(cache_dir=FLAGS.cache_dir),
                    train=TrainConfig(model_dir=model_dir, batch_size=FLAGS.batch_size,
                                      progress=False, keep_checkpoints=2))
    trainer = Trainer(config)
    trainer.restore()
    trainer.enter_phase(freeze.UNFROZEN)
    data = trainer.parts.data.train_dataset(epoch=0, global_batch=FLAGS.batch_size,
                                      input_size=config.model.input_size, seed=0).repeat()
    iterator = iter(data)

    def step():
        t = time.perf_counter()
        float(trainer.run_steps(iterator, 1)[0])
        return time.perf_counter() - t

    for _ in range(3):
        step()  # trace and warm up
    sync_opts = tf.train.CheckpointOptions()
    async_opts = tf.train.CheckpointOptions(experimental_enable_async_checkpoint=True)
    results = {"plain step": [], "sync save": [], "async save": []}
    for _ in range(FLAGS.repeats):
        for name, opts in (("sync save", sync_opts), ("async save", async_opts)):
            results["plain step"].append(step())
            t = time.perf_counter()
            trainer.checkpointer.rolling.save(options=opts)
            step()
            results[name].append(time.perf_counter() - t)
    trainer.parts.checkpoint.sync() if hasattr(trainer.parts.checkpoint, "sync") else None
    base = statistics.median(results["plain step"])
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(model_dir) for f in fs)
    print(f"{FLAGS.backbone}: checkpoint {size / 2**20:.0f} MiB on disk (two kept); "
          f"plain step {base * 1000:.0f} ms (median)")
    for name in ("sync save", "async save"):
        stall = [t - base for t in results[name]]
        print(f"  {name}: stall median {statistics.median(stall) * 1000:.0f} ms "
              f"(min {min(stall) * 1000:.0f}, max {max(stall) * 1000:.0f})")


if __name__ == "__main__":
    app.run(main)
