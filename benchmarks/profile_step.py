"""Where a train step's time goes: the engine's loop against bare loops and Keras fit.

    python benchmarks/profile_step.py                      # tiny_cnn at 32, batch 32, K=20
    python benchmarks/profile_step.py --backbone=inceptionv3 --input_size=96 --batch_size=16

One process, one model, one synthetic batch repeated; the arms' windows are
alternated as in `--mode=benchmark` (engine/bench/arms.py), so each ratio is
taken between windows measured side by side. Every arm trains the same
model's variables (each with its own optimizer), K steps per traced call:

    engine           the Trainer's train loop (guard, param groups, clipping)
    engine/K=1       the same at one step per call (--one_step, with keras_fit/spe=1)
    bare             a minimal K-step loop: tape, mean loss, apply_gradients
                     (the engine's optimizer: Keras' with fused TF kernels)
    bare/keras_opt   the bare loop with Keras' own optimizer class
    forward+backward the bare loop without the optimizer's apply
    forward          the bare loop's forward pass and loss only
    keras_fit        Keras model.fit, steps_per_execution=K
    bare+cond(loss) ... +put_back   the bare loop with the parts of the guard the
                     engine had before 2026-12-03, one at a time (--guard_parts)

So engine/bare is what the engine's own machinery costs (the non-finite
guard, parameter groups), fit/bare what Keras' does, bare/keras_opt what
the fused update kernels save, and forward+backward/bare how much of a step
the optimizer is.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

flags.DEFINE_string("backbone", "tiny_cnn", "Backbone (weights=None).")
flags.DEFINE_integer("input_size", 32, "Input size.")
flags.DEFINE_integer("batch_size", 32, "Global batch.")
flags.DEFINE_integer("steps_per_loop", 20, "K, steps per traced call (and fit's steps_per_execution).")
flags.DEFINE_integer("windows", 5, "Alternated windows per arm.")
flags.DEFINE_float("window_s", 2.0, "Seconds per window.")
flags.DEFINE_string("cache_dir", "~/.cache/tapeworks", "Where the embedded data set lives.")
flags.DEFINE_bool("guard_parts", False, "Add the bare loop plus each part of the engine's "
                  "non-finite guard in turn (see guard_loops).")
flags.DEFINE_bool("one_step", False, "Add the engine at K=1 and Keras fit at "
                  "steps_per_execution=1 (their ratio: engine / fit at one step per call).")
flags.DEFINE_integer("summaries", 0, "Add the engine with --summary_every=N and a "
                     "TensorBoard writer set (a second Trainer; 0: no such arm).")
flags.DEFINE_string("arms", "", "Comma-separated arm names to keep (default: all).")
FLAGS = flags.FLAGS


def bare_loops(model, loss_fn, optimizer, keras_optimizer):
    """{name: run_steps(iterator, k) -> (loss, 0.)} of the four bare arms (each a traced loop)."""
    import tensorflow as tf

    variables = model.trainable_variables

    def make(apply: bool, backward: bool, optimizer=optimizer):
        @tf.function
        def loop(iterator, k):
            loss = tf.constant(0.0)
            for _ in tf.range(k):
                images, labels = next(iterator)
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(loss_fn(labels, model(images, training=True)))
                if backward:
                    grads = tape.gradient(loss, variables)
                    if apply:
                        optimizer.apply_gradients(zip(grads, variables))
                    else:  # keep the gradients alive, as an apply would
                        loss += 0.0 * tf.add_n([tf.reduce_sum(g) for g in grads])
            return loss, tf.constant(0.0)

        def run_steps(iterator, num_steps):  # as Trainer.run_steps: K as a tensor, no retrace
            return loop(iterator, tf.constant(num_steps, tf.int32))
        return run_steps

    return {"bare": make(True, True), "bare/keras_opt": make(True, True, keras_optimizer),
            "forward+backward": make(False, True),
            "forward": make(False, False)}


def forward_written_state(model):
    """BatchNorm moving statistics (and seed state) of leaf layers that train: what a
    training-mode forward pass writes (the engine's guard puts them back on a bad step)."""
    out, seen = [], set()

    def walk(layer):
        children = list(getattr(layer, "_layers", []))
        if not children and layer.trainable:
            for v in layer.non_trainable_variables:
                if id(v) not in seen and tf_floating(v):
                    seen.add(id(v))
                    out.append(v)
        for child in children:
            walk(child)

    walk(model)
    return out


def tf_floating(v):
    import tensorflow as tf
    return tf.as_dtype(v.dtype).is_floating


def guard_loops(model, loss_fn, optimizer):
    """{name: run_steps} of the bare loop with the guard's parts added one at a time.

    cond(loss)      the apply under tf.cond(isfinite(loss)): only the wait for all
                    gradients before any update (and the cond's switches)
    cond(norm)      ok also needs isfinite(global_norm(grads))
    +bn_sum         ok also needs the sum of every written BN statistic finite
    +put_back       the statistics read before the forward and put back under
                    tf.cond(not ok): the engine's guard, part by part
    """
    import tensorflow as tf

    from engine.variables import as_tf_variable

    variables = model.trainable_variables
    written = [as_tf_variable(v) for v in forward_written_state(model)]

    def make(norm: bool, bn_sum: bool, put_back: bool):
        def step(images, labels):
            before = [v.read_value() for v in written] if put_back else []
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_fn(labels, model(images, training=True)))
            grads = tape.gradient(loss, variables)
            ok = tf.math.is_finite(loss)
            if norm:
                ok &= tf.math.is_finite(tf.linalg.global_norm(grads))
            if bn_sum:
                ok &= tf.math.is_finite(tf.add_n([tf.reduce_sum(v.read_value())
                                                  for v in written]))
            if put_back:
                def back():
                    for v, value in zip(written, before):
                        v.assign(value)
                    return tf.constant(True)
                tf.cond(ok, lambda: tf.constant(False), back)

            def apply():
                optimizer.apply_gradients(zip(grads, variables))
                return tf.constant(True)
            tf.cond(ok, apply, lambda: tf.constant(False))
            return loss

        @tf.function
        def loop(iterator, k):
            loss = tf.constant(0.0)
            for _ in tf.range(k):
                images, labels = next(iterator)
                loss = step(images, labels)
            return loss, tf.constant(0.0)

        def run_steps(iterator, num_steps):
            return loop(iterator, tf.constant(num_steps, tf.int32))
        return run_steps

    return {"bare+cond(loss)": make(False, False, False),
            "bare+cond(norm)": make(True, False, False),
            "+bn_sum": make(True, True, False),
            "+put_back": make(True, True, True)}


def summaries_arm(config, synthetic, k):
    """The engine with in-graph summaries every FLAGS.summaries steps, written to a file
    (the writer set around each call, as the trainer does in training)."""
    import dataclasses

    import tensorflow as tf

    from engine import freeze
    from engine.bench.arms import EngineArm
    from engine.trainer import Trainer

    train = dataclasses.replace(config.train, summary_every=FLAGS.summaries)
    trainer = Trainer(dataclasses.replace(config, train=train))
    trainer.enter_phase(freeze.UNFROZEN)
    writer = tf.summary.create_file_writer("/tmp/tapeworks_profile_step/summaries")

    def run_with_writer(iterator, num_steps):  # as the trainer calls its loop in training
        with writer.as_default():
            return trainer.run_steps(iterator, num_steps)

    arm = EngineArm(f"engine/summaries={FLAGS.summaries}", "synthetic", trainer, synthetic, k)
    arm.run_steps = run_with_writer
    return arm


def main(argv):
    del argv
    import tensorflow as tf

    from engine import freeze
    from engine.bench.arms import EngineArm, FitArm, LoopArm, alternate, ratios, summarize
    from engine.config import Config, DataConfig, ModelConfig, TrainConfig
    from engine.optimizer import make_keras_optimizer, make_schedule
    from engine.trainer import Trainer

    k = FLAGS.steps_per_loop
    config = Config(model=ModelConfig(backbone=FLAGS.backbone, input_size=FLAGS.input_size),
                    data=DataConfig(cache_dir=FLAGS.cache_dir),
                    train=TrainConfig(batch_size=FLAGS.batch_size, steps_per_loop=k,
                                      model_dir="/tmp/tapeworks_profile_step", progress=False,
                                      summary_every=0)).validated()
    trainer = Trainer(config)
    trainer.enter_phase(freeze.UNFROZEN)
    batch = next(iter(trainer.parts.data.train_dataset(epoch=0, global_batch=FLAGS.batch_size,
                                                 input_size=FLAGS.input_size, seed=0)))
    synthetic = tf.data.Dataset.from_tensors(batch).repeat()
    schedule = make_schedule(config.optimizer, trainer.parts.steps_per_epoch, config.train.epochs)
    optimizer = make_keras_optimizer(config.optimizer, schedule, name="bare")
    keras_optimizer = make_keras_optimizer(config.optimizer, schedule, name="keras", fused=False)
    arms = [EngineArm("engine", "synthetic", trainer, synthetic, k)]
    for name, run_steps in bare_loops(trainer.parts.model, trainer.parts.loss_fn, optimizer,
                                      keras_optimizer).items():
        arms.append(LoopArm(name, "synthetic", run_steps, synthetic, k))
    if FLAGS.guard_parts:
        guard_optimizer = make_keras_optimizer(config.optimizer, schedule, name="guarded")
        for name, run_steps in guard_loops(trainer.parts.model, trainer.parts.loss_fn,
                                           guard_optimizer).items():
            arms.append(LoopArm(name, "synthetic", run_steps, synthetic, k))
    arms.append(FitArm(trainer, synthetic, k))
    if FLAGS.summaries:
        arms.append(summaries_arm(config, synthetic, k))
    if FLAGS.one_step:
        arms += [EngineArm("engine/K=1", "synthetic", trainer, synthetic, 1),
                 FitArm(trainer, synthetic, 1)]
    if FLAGS.arms:
        keep = set(FLAGS.arms.split(",")) | {"bare"}
        arms = [arm for arm in arms if arm.name in keep or arm.name.split("/")[0] in keep
                and arm.name != "bare/keras_opt"]
    for arm in arms:
        arm.warm_up(FLAGS.window_s)
    alternate(arms, FLAGS.windows, FLAGS.window_s)
    bare = next(arm for arm in arms if arm.name == "bare")
    print(f"{FLAGS.backbone} {FLAGS.input_size}x{FLAGS.input_size} batch {FLAGS.batch_size}, "
          f"K={k}, {FLAGS.windows} alternated windows of >= {FLAGS.window_s} s")
    print(f"{'arm':<18} {'steps/s':>9} {'ms/step':>8}  {'/ bare (median [min - max])':<28}")
    for arm in arms:
        s = summarize(arm.rates())
        r = ratios(arm, bare)
        print(f"{arm.name:<18} {s['median']:9.2f} {1000 / s['median']:8.2f}  "
              f"{r['median']:.3f} [{r['min']:.3f} - {r['max']:.3f}]")
    by_name = {arm.name: arm for arm in arms}
    for num, den in (("engine", f"keras_fit/spe={k}"), ("engine/K=1", "keras_fit/spe=1")):
        if num in by_name and den in by_name:
            r = ratios(by_name[num], by_name[den])
            print(f"{num} / {den}: {r['median']:.3f} [{r['min']:.3f} - {r['max']:.3f}]")
    return 0


if __name__ == "__main__":
    app.run(main)
