"""Several replicas train exactly like one: 2 virtual CPUs, 2 worker processes.

conftest.py splits the CPU into 2 logical devices once for the session, so
MirroredStrategy(["/cpu:0", "/cpu:1"]) works in any test while the default
strategy still runs on one device.
"""
import json
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine import distribute, freeze
from engine.config import Config, ConfigError, DataConfig, ModelConfig, OptimizerConfig, TrainConfig
from engine.data.replicas import replica_batches
from engine.losses import make_loss
from engine.optimizer import make_param_groups, make_schedule
from engine.state import list_keys, model_variable_keys
from engine.steps import make_train_loop
from models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_CPUS = ["/cpu:0", "/cpu:1"]
LABELS, SIZE, BATCH, STEPS = 5, 32, 8, 4


def _mirrored():
    return distribute.mirrored_strategy(TWO_CPUS)


# ------------------------------------------------------------------ devices
def test_session_has_two_virtual_cpus_and_default_strategy_uses_one():
    assert len(tf.config.list_logical_devices("CPU")) == 2
    assert tf.distribute.get_strategy().num_replicas_in_sync == 1
    assert distribute.local_replica_count(tf.distribute.get_strategy()) == 1
    mirrored = _mirrored()
    assert mirrored.num_replicas_in_sync == 2
    assert distribute.local_replica_count(mirrored) == 2


def test_split_cpu_tolerates_the_same_split_and_names_the_flag_otherwise():
    distribute.split_cpu(2)  # already split by conftest: a no-op
    distribute.split_cpu(0)
    with pytest.raises(ConfigError, match="--num_virtual_cpus=3"):
        distribute.split_cpu(3)
    assert distribute.make_strategy("mirrored", 2).num_replicas_in_sync == 2


def test_strategies_made_one_after_another_do_not_share_collective_keys():
    """Without fresh keys the second strategy's first all-reduce (another shape)
    aborts every collective of the process: "Shape mismatch in the collective
    instance 100"."""
    makers = (_mirrored, lambda: tf.distribute.MirroredStrategy(TWO_CPUS), _mirrored)
    for width, make in zip((3, 5, 7), makers):
        strategy = make()
        total = strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.ones([width])))
        np.testing.assert_array_equal(strategy.experimental_local_results(total)[0], [2.0] * width)


# --------------------------------------------------- 1 replica == 2 replicas
def _images_and_labels(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)
    y = (rng.uniform(size=(n, LABELS)) < 0.4).astype(np.float32)
    return x, y


def _train_tiny_cnn(strategy, *, clipnorm, sync_bn, steps=STEPS):
    """Builds and trains tiny_cnn the way engine/trainer.py does (K steps per call, then 1).

    Returns (model, weights as numpy, the last step's global gradient norm)."""
    local = distribute.local_replica_count(strategy)
    counter = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    cfg = OptimizerConfig(name="momentum", learning_rate=0.1, momentum=0.9, schedule="constant",
                          global_clipnorm=clipnorm)
    with strategy.scope():
        model = build_model("tiny_cnn", SIZE, LABELS, sync_bn=sync_bn, seed=7)
        keys = model_variable_keys(model)
        step = tf.Variable(0, dtype=tf.int64, **counter)
        lr_scale = tf.Variable(1.0, **counter)
        groups = make_param_groups(cfg, freeze.trainable_in_every_phase(model), keys,
                                   make_schedule(cfg, steps, 1), step, lr_scale)
    trainable = {id(v) for v in model.trainable_variables}
    phase_variables = {n: [v for v in g.variables if id(v) in trainable] for n, g in groups.items()}
    loop, traces = make_train_loop(
        model=model, loss_fn=make_loss("bce", num_labels=LABELS), groups=groups,
        phase_variables=phase_variables, strategy=strategy, global_batch=BATCH,
        local_replicas=local, global_step=step, global_clipnorm=clipnorm)
    x, y = _images_and_labels(BATCH * steps)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True)
    iterator = iter(replica_batches(batches, strategy))  # each replica: its slice
    loop(iterator, tf.constant(steps - 1))
    _, norm = loop(iterator, tf.constant(1))
    assert traces["count"] == 1
    return model, [np.array(w.numpy()) for w in model.weights], float(norm)


@pytest.mark.parametrize("clipnorm", [0.0, 0.05], ids=["no_clip", "clip_binds"])
def test_two_replicas_train_like_one_with_the_same_global_batch(clipnorm):
    _, one, norm_one = _train_tiny_cnn(tf.distribute.get_strategy(), clipnorm=clipnorm, sync_bn=True)
    strategy = _mirrored()
    model, two, norm_two = _train_tiny_cnn(strategy, clipnorm=clipnorm, sync_bn=True)
    if clipnorm:
        assert norm_one > 2 * clipnorm  # the clip really binds on the last step
    np.testing.assert_allclose(norm_two, norm_one, rtol=1e-5)
    for w, a, b in zip(model.weights, one, two):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=w.path)
    # With sync BN every replica holds the same copy of every weight, BN statistics included,
    # bit for bit (EMA swaps and checkpoints read the first replica's copy).
    for w in model.weights:
        first, second = [t.numpy() for t in strategy.experimental_local_results(w.value)]
        np.testing.assert_array_equal(second, first, err_msg=w.path)


def test_without_sync_bn_each_replica_keeps_its_own_bn_statistics():
    """Why --sync_bn matters with several replicas: Keras creates BN moving
    statistics with aggregation "none", so each replica updates only its own
    copy from its half of the batch and the copies drift apart (the trainable
    weights still agree: their gradients are summed)."""
    strategy = _mirrored()
    model, _, _ = _train_tiny_cnn(strategy, clipnorm=0.0, sync_bn=False, steps=2)
    bn = model.get_layer("backbone").get_layer("block1_bn")
    a, b = strategy.experimental_local_results(bn.moving_mean.value)
    assert not np.allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=0)
    ka, kb = strategy.experimental_local_results(bn.gamma.value)
    np.testing.assert_array_equal(ka.numpy(), kb.numpy())


# ------------------------------------------------- clip the SUM, by hand
def _mse(labels, logits):
    return tf.reduce_mean(tf.square(logits - labels), axis=-1)


def test_two_replicas_clip_the_summed_gradient_not_each_replicas_part():
    w0 = np.array([[1.5], [-2.0], [0.5]], np.float32)
    b0 = np.array([0.25], np.float32)
    x = np.array([[1, 0, 2], [0, 1, 1], [3, 1, 0], [-1, 2, 1]], np.float32)
    y = np.array([[0.0], [1.0], [-4.0], [6.0]], np.float32)
    clip = 1.0
    strategy = _mirrored()
    cfg = OptimizerConfig(name="sgd", learning_rate=1.0, schedule="constant", global_clipnorm=clip)
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
        model=model, loss_fn=_mse, groups=groups, phase_variables={"head": model.trainable_variables},
        strategy=strategy, global_batch=4, local_replicas=2, global_step=step,
        global_clipnorm=clip)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(4, drop_remainder=True)
    _, norm = loop(iter(replica_batches(batches, strategy)), tf.constant(1))

    def grad(xs, ys):  # d/d(w, b) of sum over xs of (x w + b - y)^2 / 4 (the global batch)
        xs, ys = xs.astype(np.float64), ys.astype(np.float64)
        err = xs @ w0 + b0 - ys
        return np.concatenate([(2.0 / 4 * xs.T @ err).ravel(), 2.0 / 4 * err.sum(axis=0)])

    def clipped(g):
        return g * min(1.0, clip / np.linalg.norm(g))

    g0, g1 = grad(x[:2], y[:2]), grad(x[2:], y[2:])  # replica 0 and replica 1
    summed = g0 + g1
    want = np.concatenate([w0.ravel(), b0]) - clipped(summed)
    wrong = np.concatenate([w0.ravel(), b0]) - (clipped(g0) + clipped(g1))  # Keras' order
    got = np.concatenate([model.get_layer("dense").kernel.numpy().ravel(),
                          model.get_layer("dense").bias.numpy()])
    assert np.linalg.norm(summed) > 2 * clip and np.abs(want - wrong).max() > 0.1
    np.testing.assert_allclose(float(norm), np.linalg.norm(summed), rtol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-5)


# ----------------------------------------------------------- worker_info
class _FakeStrategy:
    def __init__(self, cluster, task_type, task_id):
        self.cluster_resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id)


def test_worker_info():
    assert distribute.worker_info(tf.distribute.get_strategy()) == (1, 0, True)
    assert distribute.worker_info(_mirrored()) == (1, 0, True)
    workers = {"worker": ["h:1", "h:2"]}
    assert distribute.worker_info(_FakeStrategy(workers, "worker", 0)) == (2, 0, True)
    assert distribute.worker_info(_FakeStrategy(workers, "worker", 1)) == (2, 1, False)
    with_chief = {"chief": ["h:0"], "worker": ["h:1", "h:2"]}
    assert distribute.worker_info(_FakeStrategy(with_chief, "chief", 0)) == (3, 0, True)
    assert distribute.worker_info(_FakeStrategy(with_chief, "worker", 0)) == (3, 1, False)
    assert distribute.worker_info(_FakeStrategy(with_chief, "worker", 1)) == (3, 2, False)


def test_multi_worker_strategy_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        distribute.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        distribute.make_strategy("multi_worker")


# --------------------------------------------------------- Trainer, mirrored
def test_trainer_runs_an_epoch_on_two_mirrored_replicas(tmp_path, embedded_cache):
    from engine.trainer import Trainer
    config = Config(
        model=ModelConfig(backbone="tiny_cnn", input_size=SIZE),
        data=DataConfig(cache_dir=embedded_cache),
        train=TrainConfig(model_dir=str(tmp_path / "run"), epochs=1, batch_size=16,
                          steps_per_epoch=3, strategy="mirrored", num_virtual_cpus=2,
                          ema_decay=0.9, progress=False))
    trainer = Trainer(config)
    assert trainer.parts.strategy.num_replicas_in_sync == 2 and trainer.parts.local_replicas == 2
    result = trainer.train()
    assert np.isfinite(result["loss"]) and np.isfinite(result["val_loss"])
    assert "val_ema_loss" in result
    assert int(trainer.parts.counters.global_step.numpy()) == 3
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("ckpt-3")


# ------------------------------------------------------ two worker processes
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_worker_processes_end_with_identical_weights(tmp_path, embedded_cache):
    from engine.data import embedded
    embedded.ensure(embedded_cache)  # made once here, not raced by two workers
    model_dir = tmp_path / "run"
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    procs, logs = [], []
    for index in range(2):
        env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": cluster,
                                         "task": {"type": "worker", "index": index}}))
        log = open(tmp_path / f"worker{index}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "tests", "multiworker_worker.py"),
             str(model_dir), embedded_cache, str(tmp_path / f"worker{index}.npz")],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    deadline = time.monotonic() + 120
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail("multi-worker run did not finish in 120 s:\n" + _tails(tmp_path))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    assert [p.returncode for p in procs] == [0, 0], _tails(tmp_path)

    runs = [np.load(tmp_path / f"worker{i}.npz") for i in range(2)]
    infos = [json.loads(str(r["info"])) for r in runs]
    for i, info in enumerate(infos):  # worker_info agrees with the strategy's cluster_resolver
        assert info["task_type"] == "worker" and info["task_id"] == i
        assert info["cluster"] == cluster
        assert info["worker_info"] == [2, i, i == 0]
        assert info["replicas"] == 2 and info["local_replicas"] == 1
    assert infos[0]["loss"] == infos[1]["loss"]
    keys = [k for k in runs[0].files if k != "info"]
    assert sorted(keys) == sorted(k for k in runs[1].files if k != "info")
    assert any(k.startswith("state/model/") for k in keys) and any(
        k.startswith("state/ema/") for k in keys)
    for k in keys:
        np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k)

    # Only the chief's checkpoints stay in model_dir; the other worker's copy is gone.
    assert not (model_dir / ".workers").exists()
    assert sorted(os.listdir(model_dir / "checkpoints")) == [
        "checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index",
        "ckpt-3.data-00000-of-00001", "ckpt-3.index"]
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    assert set(list_keys(latest)) >= {k[len("state/"):] for k in keys}
    reader = tf.train.load_checkpoint(latest)
    for k in keys:
        np.testing.assert_array_equal(
            reader.get_tensor(k[len("state/"):] + "/.ATTRIBUTES/VARIABLE_VALUE"), runs[0][k])


def _tails(tmp_path):
    out = []
    for i in range(2):
        path = tmp_path / f"worker{i}.log"
        if path.exists():
            lines = [l for l in path.read_text().splitlines() if not l.startswith(("I0000", "W0000"))]
            out.append(f"--- worker {i} ---\n" + "\n".join(lines[-20:]))
    return "\n".join(out)


def test_jit_compile_with_two_replicas_is_refused_naming_the_flag(tmp_path, embedded_cache):
    from engine.trainer import Trainer
    config = Config(
        model=ModelConfig(backbone="tiny_cnn", input_size=SIZE),
        data=DataConfig(cache_dir=embedded_cache),
        train=TrainConfig(model_dir=str(tmp_path / "run"), strategy="mirrored",
                          num_virtual_cpus=2, jit_compile=True, progress=False))
    with pytest.raises(ConfigError, match=r"--jit_compile works with one replica only; "
                                          r"--strategy=mirrored runs 2"):
        Trainer(config)
