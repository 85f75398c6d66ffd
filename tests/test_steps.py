"""The traced train step: a hand-computed SGD update, K steps per call, one trace, replicas."""
import numpy as np
import pytest
import keras
import tensorflow as tf

import replicas_worker as worker
from engine import distribute
from engine.config import OptimizerConfig
from engine.ema import EMA
from engine.optimizer import make_param_groups, make_schedule
from engine.state import model_variable_keys
from engine.steps import holds_xla_function, make_eval_batch, make_train_loop


def _mse(labels, logits):
    return tf.reduce_mean(tf.square(logits - labels), axis=-1)


def _dense_model(kernel, bias):
    inputs = keras.Input([3])
    outputs = keras.layers.Dense(1, name="dense")(inputs)
    model = keras.Model(inputs, outputs)
    model.get_layer("dense").set_weights([kernel, bias])
    return model


def _loop(model, opt_cfg, global_batch, clipnorm=0.0, jit_compile=False, after_step=None):
    keys = model_variable_keys(model)
    step = tf.Variable(0, dtype=tf.int64)
    groups = make_param_groups(opt_cfg, {"head": model.trainable_variables}, keys,
                               make_schedule(opt_cfg, 10, 1), step, tf.Variable(1.0))
    loop, traces = make_train_loop(
        model=model, loss_fn=_mse, groups=groups,
        phase_variables={"head": model.trainable_variables},
        strategy=tf.distribute.get_strategy(), global_batch=global_batch, local_replicas=1,
        global_step=step, global_clipnorm=clipnorm, jit_compile=jit_compile,
        after_step=after_step)
    return loop, traces, step


def _data(n=16, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = rng.normal(size=(n, 1)).astype(np.float32)
    return x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_one_sgd_step_equals_hand_computed_update():
    w = np.array([[0.5], [-1.0], [2.0]], np.float32)
    b = np.array([0.25], np.float32)
    model = _dense_model(w, b)
    cfg = OptimizerConfig(name="sgd", learning_rate=0.1, schedule="constant")
    loop, _, step = _loop(model, cfg, global_batch=4)
    x, y, ds = _data()
    loss, _ = loop(iter(ds), tf.constant(1))

    xb, yb = x[:4].astype(np.float64), y[:4].astype(np.float64)
    err = xb @ w + b - yb  # [4, 1]
    grad_w = 2.0 / 4 * xb.T @ err
    grad_b = 2.0 / 4 * err.sum(axis=0)
    np.testing.assert_allclose(float(loss), np.mean(err ** 2), atol=1e-6)
    np.testing.assert_allclose(model.get_layer("dense").kernel.numpy(), w - 0.1 * grad_w, atol=1e-6)
    np.testing.assert_allclose(model.get_layer("dense").bias.numpy(), b - 0.1 * grad_b, atol=1e-6)
    assert int(step.numpy()) == 1


def test_global_clipnorm_clips_the_update_to_hand_computed_norm():
    w = np.array([[5.0], [-4.0], [3.0]], np.float32)
    b = np.array([1.0], np.float32)
    model = _dense_model(w, b)
    cfg = OptimizerConfig(name="sgd", learning_rate=1.0, schedule="constant")
    loop, _, _ = _loop(model, cfg, global_batch=4, clipnorm=0.5)
    x, y, ds = _data()
    _, norm = loop(iter(ds), tf.constant(1))
    xb, yb = x[:4].astype(np.float64), y[:4].astype(np.float64)
    err = xb @ w + b - yb
    grads = np.concatenate([(2.0 / 4 * xb.T @ err).ravel(), 2.0 / 4 * err.sum(axis=0)])
    np.testing.assert_allclose(float(norm), np.linalg.norm(grads), rtol=1e-5)
    clipped = grads * 0.5 / np.linalg.norm(grads)
    np.testing.assert_allclose(model.get_layer("dense").kernel.numpy().ravel(), w.ravel() - clipped[:3],
                               atol=1e-5)


def test_k_steps_per_call_equal_k_single_calls_and_trace_once():
    w = np.array([[0.5], [-1.0], [2.0]], np.float32)
    b = np.array([0.0], np.float32)
    cfg = OptimizerConfig(name="momentum", learning_rate=0.05, momentum=0.9, schedule="cosine")
    one, two = _dense_model(w, b), _dense_model(w, b)
    loop_k, traces_k, _ = _loop(one, cfg, global_batch=4)
    loop_1, traces_1, _ = _loop(two, cfg, global_batch=4)
    _, _, ds = _data()
    loop_k(iter(ds), tf.constant(4))
    it = iter(ds)
    for _ in range(4):
        loop_1(it, tf.constant(1))
    for a, b_ in zip(one.weights, two.weights):
        np.testing.assert_allclose(a.numpy(), b_.numpy(), rtol=0, atol=1e-7)
    assert traces_k["count"] == 1 and traces_1["count"] == 1  # num_steps is a tensor: no retrace


def test_eval_batch_returns_probabilities_for_a_short_batch():
    inputs = keras.Input([4, 4, 3])
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, outputs)
    eval_batch = make_eval_batch(model=model, loss_fn=_mse, strategy=tf.distribute.get_strategy(),
                                 local_replicas=1, input_size=4, num_outputs=2, multiclass=False)
    images = tf.random.uniform([3, 4, 4, 3])
    probs, per_example = eval_batch(images, tf.zeros([3, 2]))
    logits = model(images).numpy()
    np.testing.assert_allclose(probs.numpy(), 1 / (1 + np.exp(-logits)), rtol=1e-5)
    np.testing.assert_allclose(per_example.numpy(), np.mean(logits ** 2, axis=-1), rtol=1e-5)


def test_xla_compiled_loop_gives_the_same_weights():
    cfg = OptimizerConfig(name="momentum", learning_rate=0.05, momentum=0.9, schedule="constant")
    w = np.array([[0.5], [-1.0], [2.0]], np.float32)
    b = np.array([0.25], np.float32)
    x, y, ds = _data()
    weights = []
    for jit in (False, True):
        model = _dense_model(w, b)
        loop, _, _ = _loop(model, cfg, global_batch=4, jit_compile=jit)
        loop(iter(ds), tf.constant(4, tf.int32))
        weights.append([v.numpy() for v in model.trainable_variables])
        concrete = loop.get_concrete_function(iter(ds), tf.constant(4, tf.int32))
        assert holds_xla_function(concrete) == jit  # the traced loop really holds XLA, or not
    for a, b_ in zip(*weights):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_only_an_xla_forward_pass_counts_as_an_xla_loop_not_the_ema(jit):
    """The EMA update is XLA-compiled in every averaging loop (engine/ema.py); the
    --jit_compile check must still see whether the forward/backward pass is."""
    cfg = OptimizerConfig(name="sgd", learning_rate=0.05, schedule="constant")
    model = _dense_model(np.ones((3, 1), np.float32), np.zeros([1], np.float32))
    ema = EMA(model.weights, model_variable_keys(model), 0.9, False, tf.distribute.get_strategy())
    ema.start_phase(model.trainable_variables, reset_new=True)
    loop, _, _ = _loop(model, cfg, global_batch=4, jit_compile=jit, after_step=ema.update)
    _, _, ds = _data()
    loop(iter(ds), tf.constant(2, tf.int32))
    assert int(ema.num_updates.numpy()) == 2
    concrete = loop.get_concrete_function(iter(ds), tf.constant(2, tf.int32))
    assert holds_xla_function(concrete) == jit


@pytest.mark.parametrize("name", ["adam", "momentum", "adamw"])
def test_a_variable_without_a_gradient_is_left_out_of_the_update(name):
    """A None gradient is not a zero gradient: weight decay and slots must not move it."""
    w = np.array([[0.5], [-1.0], [2.0]], np.float32)
    b = np.array([0.25], np.float32)
    cfg = OptimizerConfig(name=name, learning_rate=0.1, schedule="constant", weight_decay=0.1)
    x, y, ds = _data()

    def run(with_unused):
        model = _dense_model(w, b)
        keys = model_variable_keys(model)
        unused = tf.Variable(np.ones([2], np.float32), name="unused")
        keys[id(unused)] = "unused"
        trained = model.trainable_variables + ([unused] if with_unused else [])
        step = tf.Variable(0, dtype=tf.int64)
        groups = make_param_groups(cfg, {"head": trained}, keys, make_schedule(cfg, 10, 1), step,
                                   tf.Variable(1.0))
        loop, _ = make_train_loop(model=model, loss_fn=_mse, groups=groups,
                                  phase_variables={"head": trained},
                                  strategy=tf.distribute.get_strategy(), global_batch=4,
                                  local_replicas=1, global_step=step)
        loop(iter(ds), tf.constant(3))
        return model, unused, groups["head"]

    model, unused, group = run(with_unused=True)
    np.testing.assert_array_equal(unused.numpy(), np.ones([2], np.float32))
    for key, slot in group.slots.items():
        if key.startswith(f"{name}/unused/"):
            np.testing.assert_array_equal(slot.numpy(), 0.0)
    reference, _, _ = run(with_unused=False)
    for a, r in zip(model.trainable_variables, reference.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), r.numpy())


# ------------------------------------------ replicas fed their own slice
# tests/replicas_worker.py runs these on 1, 2 and 3 virtual CPUs (MirroredStrategy),
# each in a process of its own (the replica_runs fixture, conftest.py).
def _old_slicing_reference(x, y, replicas):
    """The weights the old in-step slicing trained to, in float64.

    Replica j took rows [j*b, (j+1)*b) of each global batch, averaged its
    squared error over the GLOBAL batch; the replicas' gradients were summed,
    clipped to the global norm, and applied by momentum SGD (Keras' rule:
    m = momentum*m - lr*g; w += m).
    """
    batch, b = worker.GLOBAL_BATCH, worker.GLOBAL_BATCH // replicas
    w = np.array([[0.5], [-1.0], [2.0]], np.float64)
    bias = np.array([0.25], np.float64)
    m_w, m_b = np.zeros_like(w), np.zeros_like(bias)
    norms = []
    for step in range(worker.STEPS):
        g_w, g_b = np.zeros_like(w), np.zeros_like(bias)
        for j in range(replicas):
            rows = slice(step * batch + j * b, step * batch + (j + 1) * b)
            xs, ys = x[rows].astype(np.float64), y[rows].astype(np.float64)
            err = xs @ w + bias - ys
            g_w += 2.0 / batch * xs.T @ err
            g_b += 2.0 / batch * err.sum(axis=0)
        norm = np.sqrt((g_w ** 2).sum() + (g_b ** 2).sum())
        norms.append(norm)
        scale = min(1.0, worker.CLIPNORM / norm)
        m_w = worker.MOMENTUM * m_w - worker.LEARNING_RATE * scale * g_w
        m_b = worker.MOMENTUM * m_b - worker.LEARNING_RATE * scale * g_b
        w, bias = w + m_w, bias + m_b
    return w, bias, norms


@pytest.mark.parametrize("replicas", [2, 3])
def test_each_replica_function_is_traced_with_its_slice_only(replica_runs, replicas):
    run = replica_runs[replicas]
    b = worker.GLOBAL_BATCH // replicas
    # The loop's iterator holds one [b, ...] spec per replica (the old path's held the
    # whole batch, [6, 3] and [6, 1]), and each replica's model call sees b rows.
    np.testing.assert_array_equal(run["spec_shapes"], [[b, 3]] * replicas + [[b, 1]] * replicas)
    np.testing.assert_array_equal(run["traced_shapes"], [[b, 3]] * replicas)
    # Every get-next of the traced loop is read on one device only. The old path's one
    # get-next of the whole batch was read by a slice on every replica's device, i.e.
    # copied to each of them: N whole batches per step.
    readers = run["get_next_readers"].tolist()
    assert readers and all("," not in r for r in readers), readers


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_replicas_train_to_the_weights_of_the_old_in_step_slicing(replica_runs, replicas):
    run = replica_runs[replicas]
    w, bias, norms = _old_slicing_reference(run["x"], run["y"], replicas)
    assert norms[0] > 2 * worker.CLIPNORM  # the clip binds: a replica's share would show
    np.testing.assert_allclose(run["weights_0"], w, rtol=0, atol=2e-6)
    np.testing.assert_allclose(run["weights_1"], bias, rtol=0, atol=2e-6)


@pytest.mark.parametrize("replicas", [2, 3])
def test_eval_cuts_a_short_batch_on_the_host_and_gathers_it_exactly(replica_runs, replicas):
    run = replica_runs[replicas]
    images = run["eval_images"].astype(np.float64)
    logits = images.mean(axis=(1, 2)) @ run["eval_kernel"] + run["eval_bias"]
    np.testing.assert_allclose(run["eval_probs"], 1 / (1 + np.exp(-logits)), rtol=1e-5)
    np.testing.assert_allclose(run["eval_loss"], np.mean(logits ** 2, axis=-1), rtol=1e-5)
    # The padded whole batch is read on the host only (by the split), never on a replica's
    # own device: each device receives its part.
    readers = set(run["eval_pad_readers"].tolist())
    assert readers and all(r.endswith("device:CPU:0") for r in readers), readers


def test_a_loop_of_two_replicas_refuses_whole_batches():
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    cfg = OptimizerConfig(name="sgd", learning_rate=0.1, schedule="constant")
    with strategy.scope():
        model = _dense_model(np.ones([3, 1], np.float32), np.zeros([1], np.float32))
        step = tf.Variable(0, dtype=tf.int64, trainable=False,
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        groups = make_param_groups(cfg, {"head": model.trainable_variables},
                                   model_variable_keys(model), make_schedule(cfg, 10, 1), step,
                                   tf.Variable(1.0, trainable=False))
    loop, _ = make_train_loop(model=model, loss_fn=_mse, groups=groups,
                              phase_variables={"head": model.trainable_variables},
                              strategy=strategy, global_batch=4, local_replicas=2,
                              global_step=step)
    _, _, ds = _data()
    with pytest.raises(TypeError, match="needs per-replica batches"):
        loop(iter(ds), tf.constant(1))
