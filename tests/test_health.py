"""Training health: the non-finite guard, rollback, diagnosis, clipping, in-graph summaries.

Small Keras models and tiny_cnn at 32 px; several replicas are 2 virtual CPUs
(tests/conftest.py).
"""
import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine import distribute
from engine.controller import Controller
from engine.config import Config, DataConfig, FreezeConfig, ModelConfig, OptimizerConfig, \
    TrainConfig
from engine.data.replicas import replica_batches
from engine.ema import EMA
from engine.health import StepGuard, StepSummaries, TrainingDiverged, diagnose, \
    histogram_buckets
from engine.optimizer import make_param_groups, make_schedule
from engine.parts import build_parts
from engine.state import model_variable_keys
from engine.steps import make_train_loop
from engine.freeze import changing_weights
from engine.trainer import Trainer

TWO_CPUS = ["/cpu:0", "/cpu:1"]


def _strategy(replicas):
    return (tf.distribute.get_strategy() if replicas == 1
            else distribute.mirrored_strategy(TWO_CPUS))


# ------------------------------------------------------- the guard, in the step
def _mse_and_poison(labels, logits):
    """MSE, plus a term whose value is 0 but whose gradient is NaN when labels[:, 0] > 5."""
    flag = tf.cast(labels[:, :1] > 5.0, tf.float32)
    trap = tf.sqrt(logits[:, :1] * 0.0 * flag + (1.0 - flag))  # sqrt(0): d/dx = inf * 0
    return tf.reduce_mean(tf.square(logits - labels), axis=-1) + trap[:, 0] - (1.0 - flag[:, 0])


def _conv_bn_model():
    inputs = keras.Input([8, 8, 3])
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.5, name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2, seed=1, name="drop")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))


def _every_copy(variables, strategy):
    """Each replica's copy of each variable, as numpy (bit-exact comparisons)."""
    out = []
    for v in variables:
        v = v.value if hasattr(v, "value") and not isinstance(v, tf.Variable) else v
        out += [np.array(t.numpy()) for t in strategy.experimental_local_results(v)]
    return out


def _head_group(cfg, model, trained):
    """(keys, global step, {"head": group of `trained`}), made under the strategy's scope."""
    counter = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    keys = model_variable_keys(model)
    step = tf.Variable(0, dtype=tf.int64, **counter)
    groups = make_param_groups(cfg, {"head": trained}, keys, make_schedule(cfg, 10, 1), step,
                               tf.Variable(1.0, **counter))
    return keys, step, groups


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_bad_step_changes_nothing_and_is_counted(replicas):
    strategy = _strategy(replicas)
    cfg = OptimizerConfig(name="adam", learning_rate=0.01, schedule="constant")
    with strategy.scope():
        model = _conv_bn_model()
        keys, step, groups = _head_group(cfg, model, model.trainable_variables)
        ema = EMA(model.weights, keys, 0.9, True, strategy)
        guard = StepGuard()
    ema.start_phase(changing_weights(model), reset_new=False)
    loop, traces = make_train_loop(
        model=model, loss_fn=_mse_and_poison, groups=groups,
        phase_variables={"head": model.trainable_variables}, strategy=strategy, global_batch=4,
        local_replicas=replicas, global_step=step, after_step=ema.update, guard=guard)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (20, 8, 8, 3)).astype(np.float32)
    y = rng.uniform(0, 1, (20, 2)).astype(np.float32)
    x[5, 1, 1, 2] = np.nan  # batch 1: a NaN pixel (-> NaN loss)
    y[9, 0] = np.inf  # batch 2: an infinite label
    y[12:16, 0] = 7.0  # batch 3: finite loss, NaN gradients
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(4, drop_remainder=True)
    with strategy.scope():
        guard.keep_batches(batches.element_spec)  # the whole worker batch, from both replicas
    iterator = iter(replica_batches(batches, strategy))
    state = (model.weights + [w for g in groups.values() for w in g.optimizer.variables]
             + ema.shadows + [ema.num_updates])
    one = tf.constant(1)

    before = _every_copy(state, strategy)
    loss, _ = loop(iterator, one)  # batch 0: good
    assert np.isfinite(float(loss))
    changed = _every_copy(state, strategy)
    assert sum(not np.array_equal(a, b) for a, b in zip(before, changed)) > len(before) // 2
    for bad in range(1, 4):  # batches 1, 2, 3: bad, each in its own way
        loss, _ = loop(iterator, one)
        assert np.isnan(float(loss))  # the mean over no good step
        after = _every_copy(state, strategy)
        for a, b in zip(changed, after):
            np.testing.assert_array_equal(a, b)  # weights, BN statistics, slots, EMA: untouched
        assert int(guard.bad_steps.numpy()) == bad and int(guard.consecutive.numpy()) == bad
    assert int(step.numpy()) == 4  # the global step counts consumed batches
    np.testing.assert_array_equal(guard.bad_batch[0].numpy(), x[12:16])  # the last bad batch
    np.testing.assert_array_equal(guard.bad_batch[1].numpy(), y[12:16])
    assert all(int(g.optimizer.iterations.numpy()) == 1 for g in groups.values())
    loss, _ = loop(iterator, one)  # batch 4: good again
    assert np.isfinite(float(loss))
    assert int(guard.bad_steps.numpy()) == 3 and int(guard.consecutive.numpy()) == 0
    assert traces["count"] == 1


def _guarded_ema_loop(strategy, weights_from=None):
    """(loop, state, ema, guard) of a conv-BN model with Adam, EMA and a guard; weights_from:
    a model whose weights it starts from (so two loops start bit-equal)."""
    cfg = OptimizerConfig(name="adam", learning_rate=0.01, schedule="constant")
    with strategy.scope():
        model = _conv_bn_model()
        if weights_from is not None:
            model.set_weights(weights_from.get_weights())
        keys, step, groups = _head_group(cfg, model, model.trainable_variables)
        ema = EMA(model.weights, keys, 0.9, True, strategy)
        guard = StepGuard()
    ema.start_phase(changing_weights(model), reset_new=False)
    loop, _ = make_train_loop(
        model=model, loss_fn=_mse_and_poison, groups=groups,
        phase_variables={"head": model.trainable_variables}, strategy=strategy, global_batch=4,
        local_replicas=distribute.local_replica_count(strategy), global_step=step,
        after_step=ema.update, guard=guard)
    state = (model.weights + [w for g in groups.values() for w in g.optimizer.variables]
             + ema.shadows + [ema.num_updates, step])
    return loop, state, ema, model


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_deferred_ema_update_of_a_call_equals_one_update_per_good_step(replicas):
    """The EMA update of a good step runs beside the next step (steps.py): a call of six
    steps, bad ones in the middle and last, must leave exactly the state of six calls of
    one step each, where every update runs at the end of its own call."""
    strategy = _strategy(replicas)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (24, 8, 8, 3)).astype(np.float32)
    y = rng.uniform(0, 1, (24, 2)).astype(np.float32)
    y[8:12, 0] = 7.0  # batch 2: NaN gradients
    x[21, 0, 0, 0] = np.nan  # batch 5, the call's last step: NaN loss
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(4, drop_remainder=True)
    whole, whole_state, ema, model = _guarded_ema_loop(strategy)
    single, single_state, _, _ = _guarded_ema_loop(strategy, weights_from=model)
    whole(iter(replica_batches(batches, strategy)), tf.constant(6))
    iterator = iter(replica_batches(batches, strategy))
    for _ in range(6):
        single(iterator, tf.constant(1))
    assert int(ema.num_updates.numpy()) == 4  # the four good steps, each once
    for a, b in zip(_every_copy(whole_state, strategy), _every_copy(single_state, strategy)):
        np.testing.assert_array_equal(a, b)
    kernel = model.get_layer("logits").kernel
    shadow = ema.shadows[[id(w) for w in ema.weights].index(id(kernel))]
    assert not np.array_equal(shadow.numpy(), kernel.numpy())  # an average, not a copy


class _SideStatistics(keras.layers.Layer):
    """A BatchNorm on x runs beside the model, its output unused; ones go on. On x with
    1e20 in it the variance overflows (inf) while the loss and every gradient stay finite."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = keras.layers.BatchNormalization(name="side_bn")

    def build(self, shape):
        self.bn.build(shape)

    def call(self, x, training=None):
        self.bn(x, training=training)
        return tf.ones_like(x)


@pytest.mark.parametrize("replicas", [1, 2])
def test_an_overflowed_bn_statistic_alone_makes_a_bad_step_and_rng_state_waits(replicas):
    strategy = _strategy(replicas)
    cfg = OptimizerConfig(name="sgd", learning_rate=0.1, schedule="constant")
    with strategy.scope():
        inputs = keras.Input([3])
        side = _SideStatistics(name="side")(inputs)
        hidden = keras.layers.Dropout(0.5, seed=3, name="drop")(side)
        model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(hidden))
        trained = model.get_layer("logits").trainable_variables
        _, step, groups = _head_group(cfg, model, trained)
        guard = StepGuard()
    loop, _ = make_train_loop(
        model=model, loss_fn=_mse, groups=groups, phase_variables={"head": trained},
        strategy=strategy, global_batch=4, local_replicas=replicas, global_step=step,
        guard=guard)
    x = np.ones((8, 3), np.float32)
    x[4::2, 0] = 1e20  # batch 1 (and each replica's half): a variance of ~(5e19)^2 = inf
    batches = tf.data.Dataset.from_tensor_slices((x, np.zeros((8, 2), np.float32))).batch(
        4, drop_remainder=True)
    with strategy.scope():
        iterator = iter(replica_batches(batches, strategy))  # each replica its own half
    state = list(model.variables)  # weights, BN statistics and the dropout seed state
    before = _every_copy(state, strategy)
    loss, _ = loop(iterator, tf.constant(1))  # batch 0: good, writes statistics and seed state
    assert np.isfinite(float(loss)) and int(guard.bad_steps.numpy()) == 0
    changed = _every_copy(state, strategy)
    moved = [not np.array_equal(a, b) for a, b in zip(before, changed)]
    seed_copies = [i for i, v in enumerate(v for v in state
                                           for _ in range(replicas)) if "seed" in v.path]
    assert seed_copies and all(moved[i] for i in seed_copies)
    side_bn = model.get_layer("side").bn
    # momentum 0.99: moving variance 0.99 * 1 + 0.01 * 0 (every row of batch 0 is ones)
    np.testing.assert_allclose(side_bn.moving_variance.numpy(), 0.99, rtol=1e-6)
    loss, _ = loop(iterator, tf.constant(1))  # batch 1: finite loss, overflowed variance
    assert np.isnan(float(loss)) and int(guard.bad_steps.numpy()) == 1
    for a, b in zip(changed, _every_copy(state, strategy)):
        np.testing.assert_array_equal(a, b)
    assert int(groups["head"].optimizer.iterations.numpy()) == 1


# --------------------------------------------------------------- diagnosis
class _Log(keras.layers.Layer):
    def call(self, x):
        return tf.math.log(x)


class _SqrtOfZero(keras.layers.Layer):
    def call(self, x):
        return x + tf.sqrt(x - x)  # forward: x; backward: 1 + inf - inf = NaN


def _chain(middle):
    inputs = keras.Input([3])
    x = keras.layers.Dense(4, name="first", kernel_initializer="ones")(inputs)
    x = middle(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))


def _mse(labels, logits):
    return tf.reduce_mean(tf.square(logits - labels), axis=-1)


def test_diagnosis_names_the_first_non_finite_activation_or_gradient():
    negative = -np.ones((2, 3), np.float32)
    labels = np.zeros((2, 2), np.float32)
    model = _chain(_Log(name="log_layer"))
    line = diagnose(model, _mse, negative, labels, 2, model_variable_keys(model))
    assert "activation" in line and "log_layer" in line
    model = _chain(_SqrtOfZero(name="sqrt_layer"))  # forward finite, backward not
    line = diagnose(model, _mse, negative, labels, 2, model_variable_keys(model))
    assert "gradient" in line and "sqrt_layer" in line, line
    nan_input = np.full((2, 3), np.nan, np.float32)
    assert "input batch" in diagnose(model, _mse, nan_input, labels, 2, model_variable_keys(model))
    model.get_layer("logits").kernel.assign(np.full((4, 2), np.inf, np.float32))
    assert "weight logits/kernel" in diagnose(model, _mse, negative, labels, 2,
                                              model_variable_keys(model))


# ---------------------------------------------------------------- clipping
@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("kind", ["clipvalue", "clipnorm", "global_clipnorm", "all_three"])
def test_clipping_matches_hand_computation(replicas, kind):
    """Clipping acts on the replica-SUMMED gradient, the same with 1 and 2 replicas."""
    w0 = np.array([[1.5], [-2.0], [0.5]], np.float32)
    b0 = np.array([0.25], np.float32)
    x = np.array([[1, 0, 2], [0, 1, 1], [3, 1, 0], [-1, 2, 1]], np.float32)
    y = np.array([[0.0], [1.0], [-4.0], [6.0]], np.float32)
    clip = {"clipvalue": dict(clipvalue=0.7), "clipnorm": dict(clipnorm=1.2),
            "global_clipnorm": dict(global_clipnorm=1.0),
            "all_three": dict(clipvalue=2.0, clipnorm=2.5, global_clipnorm=2.0)}[kind]
    strategy = _strategy(replicas)
    cfg = OptimizerConfig(name="sgd", learning_rate=1.0, schedule="constant")
    with strategy.scope():
        inputs = keras.Input([3])
        model = keras.Model(inputs, keras.layers.Dense(1, name="dense")(inputs))
        model.get_layer("dense").set_weights([w0, b0])
        step = tf.Variable(0, dtype=tf.int64, trainable=False,
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        groups = make_param_groups(cfg, {"head": model.trainable_variables},
                                   model_variable_keys(model), make_schedule(cfg, 1, 1), step,
                                   tf.Variable(1.0, trainable=False))
    loop, _ = make_train_loop(
        model=model, loss_fn=_mse, groups=groups,
        phase_variables={"head": model.trainable_variables}, strategy=strategy, global_batch=4,
        local_replicas=replicas, global_step=step, **clip)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(4, drop_remainder=True)
    _, norm = loop(iter(replica_batches(batches, strategy)), tf.constant(1))

    xs, ys = x.astype(np.float64), y.astype(np.float64)
    err = xs @ w0 + b0 - ys
    g_w, g_b = 2.0 / 4 * xs.T @ err, 2.0 / 4 * err.sum(axis=0)  # the summed global gradient
    np.testing.assert_allclose(float(norm), np.sqrt((g_w ** 2).sum() + (g_b ** 2).sum()), rtol=1e-5)
    grads = [g_w, g_b]
    if "clipvalue" in clip:
        grads = [np.clip(g, -clip["clipvalue"], clip["clipvalue"]) for g in grads]
    if "clipnorm" in clip:
        grads = [g * min(1.0, clip["clipnorm"] / np.linalg.norm(g)) for g in grads]
    if "global_clipnorm" in clip:
        total = np.sqrt(sum((g ** 2).sum() for g in grads))
        grads = [g * min(1.0, clip["global_clipnorm"] / total) for g in grads]
    assert max(np.abs(a - b).max() for a, b in zip(grads, [g_w, g_b])) > 0.05  # clipping binds
    np.testing.assert_allclose(model.get_layer("dense").kernel.numpy(), w0 - grads[0], atol=1e-5)
    np.testing.assert_allclose(model.get_layer("dense").bias.numpy(), b0 - grads[1], atol=1e-5)


# --------------------------------------------------------------- summaries
def _events(directory):
    """tag -> [(step, value ndarray, plugin)] from every event file under directory."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                out.setdefault(value.tag, []).append(
                    (event.step, tf.make_ndarray(value.tensor), value.metadata.plugin_data.plugin_name))
    return out


def test_summaries_in_the_step_neither_retrace_nor_grow_the_graph(tmp_path):
    model = _conv_bn_model()
    keys = model_variable_keys(model)
    step = tf.Variable(0, dtype=tf.int64)
    cfg = OptimizerConfig(name="momentum", learning_rate=0.01, schedule="cosine")
    groups = make_param_groups(cfg, {"head": model.trainable_variables}, keys,
                               make_schedule(cfg, 130, 1), step, tf.Variable(1.0))
    summaries = StepSummaries(keys=keys, every=1, histogram_every=25, image_every=40,
                              label_names=["a", "b"])
    loop, traces = make_train_loop(
        model=model, loss_fn=_mse, groups=groups,
        phase_variables={"head": model.trainable_variables},
        strategy=tf.distribute.get_strategy(), global_batch=4, local_replicas=1,
        global_step=step, summaries=summaries)
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices(
        (rng.uniform(0, 255, (4, 8, 8, 3)).astype(np.float32),
         (rng.uniform(size=(4, 2)) < 0.5).astype(np.float32))).batch(4).repeat()
    iterator = iter(data)
    writer = tf.summary.create_file_writer(str(tmp_path))
    ten = tf.constant(10)
    with writer.as_default():
        loop(iterator, ten)
        graph = loop.get_concrete_function(iterator, ten).graph.as_graph_def()
        nodes, functions = len(graph.node), len(graph.library.function)
        for _ in range(11):
            loop(iterator, ten)  # 120 steps, each writing its scalars
        after = loop.get_concrete_function(iterator, ten).graph.as_graph_def()
    writer.flush()
    assert traces["count"] == 1 and loop.experimental_get_tracing_count() == 1
    assert (len(after.node), len(after.library.function)) == (nodes, functions)

    events = _events(str(tmp_path))
    assert [s for s, _, _ in events["grad_norm/global"]] == list(range(1, 121))
    assert events["grad_norm/global"][0][2] == "scalars"
    assert {"learning_rate/head", "health/loss", "health/bad_steps", "grad_norm/conv",
            "grad_norm/logits"} <= set(events)
    lr = [float(v) for _, v, _ in events["learning_rate/head"]]
    assert lr[0] > lr[-1] > 0  # the cosine schedule, read inside the step
    steps, hist, plugin = zip(*events["weights/conv/kernel"])
    assert steps == (25, 50, 75, 100) and plugin[0] == "histograms"
    assert hist[0].shape == (30, 3) and hist[0][:, 2].sum() == 3 * 3 * 3 * 4
    assert [s for s, _, _ in events["gradients/logits/kernel"]] == [25, 50, 75, 100]
    steps, image, plugin = zip(*events["inputs/predictions"])
    assert steps == (40, 80, 120) and plugin[0] == "images"
    width, height, *pngs = image[0]
    assert len(pngs) == 3 and (int(width), int(height)) == (8, 8 + 6)
    assert tf.io.decode_png(pngs[0]).shape == (14, 8, 3)
    assert events["inputs/predictions_text"][0][2] == "text"


def test_histogram_buckets_match_tensorboard_format():
    b = histogram_buckets(tf.constant([0.0, 1.0, 1.0, 3.0, np.nan]), k=3).numpy()
    np.testing.assert_allclose(b, [[0, 1, 1], [1, 2, 2], [2, 3, 1]])
    b = histogram_buckets(tf.constant([2.0, 2.0]), k=3).numpy()
    np.testing.assert_allclose(b, [[2, 2, 0], [2, 2, 0], [2, 2, 2]])
    assert histogram_buckets(tf.zeros([0]), k=3).numpy().sum() == 0


# ------------------------------------------------------ the trainer's story
def _config(tmp_path, cache, optimizer=None, **train):
    # No BN calibration: it would read the poisoned batches these tests plant.
    t = dict(model_dir=str(tmp_path / "run"), epochs=1, batch_size=16, steps_per_epoch=8,
             steps_per_loop=2, progress=False, summary_every=0, calibrate_bn_steps=0)
    t.update(train)
    return Config(model=ModelConfig(backbone="tiny_cnn", input_size=32),
                  data=DataConfig(cache_dir=cache, augment=False),
                  optimizer=optimizer or OptimizerConfig(name="momentum", learning_rate=0.05,
                                                         schedule="constant"),
                  freeze=FreezeConfig(unfreeze_at=0), train=TrainConfig(**t))


class _PoisonedData:
    """The run's data, with the training batches of these indices (of the epoch) all NaN.

    A test double handed to the controller as its data part; everything but
    train_dataset is the real data's.
    """

    def __init__(self, data, bad_batches):
        self.data = data
        self.bad_batches = sorted(bad_batches)

    def __getattr__(self, name):
        return getattr(self.data, name)

    def train_dataset(self, **kw):
        skip = kw.get("skip_batches", 0)
        bad = tf.constant(self.bad_batches, tf.int64)

        def maybe(i, batch):
            images, labels = batch
            hit = tf.reduce_any(tf.equal(i + skip, bad))
            return tf.where(hit, images * np.nan, images), labels

        return self.data.train_dataset(**kw).enumerate().map(maybe)


def _poisoned(config, bad_batches):
    """A controller over built parts whose data part is _PoisonedData (built, then run)."""
    parts = build_parts(config)
    parts.data = _PoisonedData(parts.data, bad_batches)
    return Controller(parts)


def _saved_values_are_finite(model_dir):
    paths = [p[:-len(".index")] for d in ("checkpoints", "best")
             for p in glob.glob(os.path.join(model_dir, d, "*.index"))]
    assert paths
    for path in paths:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            if not name.startswith(("model/", "optimizer/", "ema/")):
                continue
            value = reader.get_tensor(name)
            if value.dtype.kind == "f":
                assert np.all(np.isfinite(value)), (path, name)


def test_a_poisoned_batch_is_skipped_and_reported(tmp_path, embedded_cache):
    trainer = _poisoned(_config(tmp_path, embedded_cache, max_bad_steps=2, ema_decay=0.9,
                                checkpoint_every_steps=4, summary_every=2, image_every=4), {3})
    result = trainer.train()
    assert result["bad_steps"] == 1 and np.isfinite(result["loss"])
    assert int(trainer.parts.counters.rollbacks.numpy()) == 0
    assert int(trainer.parts.guard.bad_steps.numpy()) == 1
    _saved_values_are_finite(trainer.parts.model_dir)
    assert not os.path.exists(os.path.join(trainer.parts.model_dir, "rollback"))  # gone at the end
    events = _events(os.path.join(trainer.parts.model_dir, "train"))  # the step's own summaries
    assert [s for s, _, _ in events["grad_norm/global"]] == [2, 4, 6, 8]
    assert [int(v) for _, v, _ in events["health/bad_steps"]] == [0, 1, 1, 1]
    assert [s for s, _, _ in events["health/steps_per_sec"]] == [2, 4, 6, 8]  # host side
    assert {"grad_norm/backbone/block1_conv", "learning_rate/head", "learning_rate/backbone",
            "inputs/predictions", "inputs/predictions_text"} <= set(events)


def test_train_main_prints_a_diagnosis_as_a_one_line_user_error():
    import train_main
    diagnosis = TrainingDiverged("training diverged: the loss is not finite after 2 "
                                 "rollback(s); try a lower --learning_rate")
    assert train_main.user_error_line(diagnosis) == str(diagnosis)
    assert train_main.user_error_line(RuntimeError("a bug")) is None  # keeps its traceback


def test_a_huge_learning_rate_is_rolled_back_and_recovers(tmp_path, embedded_cache):
    sgd = OptimizerConfig(name="sgd", learning_rate=1e6, schedule="constant")
    trainer = Trainer(_config(tmp_path, embedded_cache, optimizer=sgd, steps_per_epoch=12,
                              max_bad_steps=2, max_rollbacks=4, bad_step_lr_factor=0.01,
                              checkpoint_every_steps=4, max_loss_ratio=0))  # the guard's path
    result = trainer.train()
    rollbacks = int(trainer.parts.counters.rollbacks.numpy())
    assert 1 <= rollbacks <= 4 and int(trainer.parts.guard.bad_steps.numpy()) >= 2
    assert float(trainer.parts.counters.lr_scale.numpy()) == pytest.approx(0.01 ** rollbacks)
    assert np.isfinite(result["loss"]) and np.isfinite(result["val_loss"])
    assert int(trainer.parts.counters.global_step.numpy()) == 12
    _saved_values_are_finite(trainer.parts.model_dir)
    # The lowered learning rate and the counts are state: a resumed run keeps them.
    again = Trainer(_config(tmp_path, embedded_cache, optimizer=sgd, steps_per_epoch=12))
    again.restore()
    assert float(again.parts.counters.lr_scale.numpy()) == pytest.approx(0.01 ** rollbacks)
    assert int(again.parts.counters.rollbacks.numpy()) == rollbacks


def test_bad_data_that_never_ends_stops_with_a_diagnosis(tmp_path, embedded_cache):
    trainer = _poisoned(_config(tmp_path, embedded_cache, max_bad_steps=2, max_rollbacks=1,
                                checkpoint_every_steps=2), set(range(4, 8)))
    with pytest.raises(TrainingDiverged) as caught:
        trainer.train()
    message = str(caught.value)
    assert "\n" not in message and "after 1 rollback(s) (--max_rollbacks=1)" in message
    assert "input batch itself holds non-finite pixel values" in message
    assert int(trainer.parts.counters.rollbacks.numpy()) == 1
    _saved_values_are_finite(trainer.parts.model_dir)


@pytest.mark.parametrize("lr", [1e6, 1e4])
def test_a_finite_but_absurd_loss_is_divergence_and_ends_in_a_diagnosis(tmp_path, embedded_cache,
                                                                         lr):
    """lr 1e6 made the eval probabilities NaN (a traceback); 1e4 finished with exit 0 at a
    loss of 3.9e15. Both must end in the guard's hands: rollbacks, then one line naming a layer."""
    sgd = OptimizerConfig(name="sgd", learning_rate=lr, schedule="constant")
    trainer = Trainer(_config(tmp_path, embedded_cache, optimizer=sgd, steps_per_epoch=4,
                              epochs=2, max_rollbacks=1).replace(freeze={"unfreeze_at": 1}))
    with pytest.raises(TrainingDiverged) as caught:
        trainer.train()
    message = str(caught.value)
    assert "\n" not in message and "after 1 rollback(s)" in message
    assert "--max_loss_ratio" in message or "not finite" in message
    assert "layer" in message or "the largest weight is" in message
    assert not os.path.exists(os.path.join(trainer.parts.model_dir, "rollback"))
