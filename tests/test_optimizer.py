"""Schedules and parameter groups, checked against hand computations."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine.config import OptimizerConfig
from engine import distribute, freeze
from engine.optimizer import (FusedAdam, FusedAdamW, FusedSGD, group_lr_multiplier,
                              make_keras_optimizer, make_param_groups, make_schedule)
from engine.state import TrainingState


def test_cosine_with_warmup_matches_hand_computation():
    cfg = OptimizerConfig(learning_rate=0.1, schedule="cosine", warmup_epochs=1)
    sched = make_schedule(cfg, steps_per_epoch=10, epochs=5)  # 10 warmup + 40 decay steps
    for step in (0, 4, 9, 10, 30, 49):
        decay = 0.5 * (1 + math.cos(math.pi * max(step - 10, 0) / 40))
        expected = 0.1 * decay * min(1.0, (step + 1) / 10)
        assert math.isclose(float(sched(step)), expected, rel_tol=1e-4), step


def test_the_schedule_restarts_with_its_warmup_when_the_backbone_thaws():
    cfg = OptimizerConfig(learning_rate=0.1, schedule="cosine", warmup_epochs=1)
    sched = make_schedule(cfg, steps_per_epoch=10, epochs=5, unfreeze_at=2)
    for step in (0, 9, 15, 19, 20, 25, 29, 30, 40, 49):
        start, length = (0, 50) if step < 20 else (20, 30)  # the run's schedule, then a restart
        t = step - start
        expected = 0.1 * 0.5 * (1 + math.cos(math.pi * max(t - 10, 0) / (length - 10))) * \
            min(1.0, (t + 1) / 10)
        assert math.isclose(float(sched(step)), expected, rel_tol=1e-4, abs_tol=1e-9), step
    whole = make_schedule(cfg, 10, 5)
    for off in (make_schedule(OptimizerConfig(learning_rate=0.1, schedule="cosine", warmup_epochs=1,
                                              restart_at_unfreeze=False), 10, 5, unfreeze_at=2),
                make_schedule(cfg, 10, 5, unfreeze_at=0), make_schedule(cfg, 10, 5, unfreeze_at=5)):
        assert [float(off(s)) for s in range(50)] == [float(whole(s)) for s in range(50)]
    steps = OptimizerConfig(learning_rate=1.0, schedule="step", lr_step_epochs=(2, 4))
    assert [float(make_schedule(steps, 3, 6, unfreeze_at=3)(s)) for s in (0, 6, 9, 12)] == \
        [float(make_schedule(steps, 3, 6)(s)) for s in (0, 6, 9, 12)]  # counts run epochs


def test_step_schedule_and_constant():
    cfg = OptimizerConfig(learning_rate=1.0, schedule="step", lr_step_epochs=(2, 4), lr_step_factor=0.5)
    sched = make_schedule(cfg, steps_per_epoch=3, epochs=6)
    assert [float(sched(s)) for s in (0, 6, 7, 12, 13)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    const = make_schedule(OptimizerConfig(learning_rate=0.2, schedule="constant"), 3, 6)
    assert float(const(100)) == np.float32(0.2)


def _groups(cfg, multiplier=1.0):
    head = keras.Variable(np.ones(3, np.float32), name="h")
    body = keras.Variable(np.ones(3, np.float32), name="b")
    keys = {id(head): "head/h", id(body): "backbone/b"}
    step = tf.Variable(0, dtype=tf.int64)
    groups = make_param_groups(cfg, {"head": [head], "backbone": [body]}, keys,
                               make_schedule(cfg, 10, 1), step, tf.Variable(1.0))
    return groups, head, body, step


def test_backbone_lr_multiplier_scales_the_backbone_update():
    cfg = OptimizerConfig(name="sgd", learning_rate=0.1, schedule="constant", backbone_lr_multiplier=0.1)
    groups, head, body, _ = _groups(cfg)
    g = tf.constant([1.0, 2.0, 3.0])
    groups["head"].apply([g], [head])
    groups["backbone"].apply([g], [body])
    np.testing.assert_allclose(head.numpy(), 1 - 0.1 * g.numpy(), rtol=1e-6)
    np.testing.assert_allclose(body.numpy(), 1 - 0.01 * g.numpy(), rtol=1e-6)


def _block_groups(cfg, num_blocks=3):
    """A head and num_blocks backbone blocks of one variable each, grouped per block."""
    blocks = [[f"block{i}"] for i in range(num_blocks)]
    variables = {"head": keras.Variable(np.ones(3, np.float32), name="h")}
    variables.update({name: keras.Variable(np.ones(3, np.float32), name=f"b{i}")
                      for i, name in enumerate(freeze.block_group_names(blocks))})
    keys = {id(v): "head/h" if name == "head" else f"backbone/block{name[-1]}/kernel"
            for name, v in variables.items()}
    step = tf.Variable(0, dtype=tf.int64)
    groups = make_param_groups(cfg, {n: [v] for n, v in variables.items()}, keys,
                               make_schedule(cfg, 10, 1), step, tf.Variable(1.0),
                               freeze.block_depths(blocks))
    return groups, variables


def test_layer_lr_decay_gives_each_block_base_x_multiplier_x_decay_to_its_depth():
    cfg = OptimizerConfig(name="sgd", learning_rate=0.1, schedule="constant",
                          backbone_lr_multiplier=0.5, layer_lr_decay=0.8)
    groups, variables = _block_groups(cfg)
    # By hand: the top block (backbone_02) 0.1 x 0.5; each block below x 0.8 more.
    expected = {"head": 0.1, "backbone_02": 0.05, "backbone_01": 0.04, "backbone_00": 0.032}
    assert {n: g.lr_multiplier for n, g in groups.items()} == pytest.approx(
        {"head": 1.0, "backbone_02": 0.5, "backbone_01": 0.4, "backbone_00": 0.32})
    g = tf.constant([1.0, 2.0, 3.0])
    for name, lr in expected.items():
        assert float(groups[name].optimizer.learning_rate) == pytest.approx(lr, rel=1e-6)
        groups[name].apply([g], [variables[name]])
        np.testing.assert_allclose(variables[name].numpy(), 1 - lr * g.numpy(), rtol=1e-6)
    assert group_lr_multiplier(cfg, "backbone") == 0.5  # one backbone group: no decay
    assert group_lr_multiplier(cfg, "head", {"backbone_00": 3}) == 1.0


def test_block_groups_have_their_own_adam_step_count_and_prefix_free_keys():
    """A block thawed later starts Adam's bias correction at 1 although others trained."""
    cfg = OptimizerConfig(name="adam", learning_rate=0.01, schedule="constant", layer_lr_decay=0.5)
    groups, variables = _block_groups(cfg)
    g = tf.constant([1.0, -2.0, 0.5])
    for _ in range(50):
        groups["backbone_02"].apply([g], [variables["backbone_02"]])
    groups["backbone_01"].apply([g], [variables["backbone_01"]])  # lr 0.01 x 0.5
    np.testing.assert_allclose(variables["backbone_01"].numpy(), 1 - 0.005 * np.sign(g.numpy()),
                               rtol=1e-4)
    state = TrainingState()  # raises on a key that is a prefix of another
    for name, group in groups.items():
        state.add_all(f"optimizer/{name}", group.state())
    assert "optimizer/backbone_01/adam/iterations" in state.keys
    assert "optimizer/backbone_01/adam/backbone/block1/kernel/momentum" in state.keys


def test_adam_bias_correction_starts_when_a_group_first_trains():
    """A backbone thawed after 100 head steps takes the same first Adam step as a fresh one."""
    cfg = OptimizerConfig(name="adam", learning_rate=0.01, schedule="constant")
    groups, head, body, step = _groups(cfg)
    g = tf.constant([1.0, -2.0, 0.5])
    for _ in range(100):
        groups["head"].apply([g], [head])
        step.assign_add(1)
    groups["backbone"].apply([g], [body])
    # Adam's first step with bias correction is lr * sign(g) (m_hat/sqrt(v_hat) = g/|g|).
    np.testing.assert_allclose(body.numpy(), 1 - 0.01 * np.sign(g.numpy()), rtol=1e-4)
    assert int(groups["backbone"].optimizer.iterations.numpy()) == 1


def test_slots_are_keyed_by_the_optimizer_kind_and_their_variable():
    """Adam's first moment and SGD's momentum buffer are both Keras "momentum": the kind tells."""
    groups, *_ = _groups(OptimizerConfig(name="adam"))
    assert sorted(groups["backbone"].state()) == [
        "adam/backbone/b/momentum", "adam/backbone/b/velocity", "adam/iterations"]
    groups, *_ = _groups(OptimizerConfig(name="momentum"))
    assert sorted(groups["backbone"].state()) == ["momentum/backbone/b/momentum",
                                                  "momentum/iterations"]


@pytest.mark.parametrize("name,extra", [("adam", {}), ("adamw", {}), ("adam", {"weight_decay": 0.01}),
                                        ("sgd", {}), ("momentum", {"momentum": 0.9})])
def test_fused_optimizers_give_keras_own_weights_and_slots(name, extra):
    """Five steps of random gradients: the fused kernels' weights and slots equal Keras'."""
    cfg = OptimizerConfig(name=name, learning_rate=0.01, schedule="constant", **extra)
    rng = np.random.default_rng(0)
    start = [rng.normal(size=s).astype(np.float32) for s in ([3, 4], [4], [2, 2, 3, 5])]
    grads = [[tf.constant(rng.normal(size=w.shape).astype(np.float32)) for w in start]
             for _ in range(5)]
    results = []
    for fused in (False, True):
        weights = [keras.Variable(w) for w in start]
        opt = make_keras_optimizer(cfg, 0.01, name=f"opt_{fused}", fused=fused)
        assert isinstance(opt, (FusedAdam, FusedAdamW, FusedSGD)) == fused
        opt.build(weights)
        step = tf.function(lambda g: opt.apply(g, weights))
        for g in grads:
            step(g)
        results.append([w.numpy() for w in weights] + [v.numpy() for v in opt.variables])
    assert len(results[0]) == len(results[1]) > len(start)
    for keras_value, fused_value in zip(*results):
        np.testing.assert_allclose(fused_value, keras_value, rtol=1e-5, atol=1e-6)  # rounding order


def test_fused_adam_under_a_two_replica_mirrored_strategy_updates_both_copies_alike():
    # engine's helper: fresh collective keys, so this strategy's all-reduces cannot collide with
    # another test's in the same process (engine/distribute.py)
    strategy = distribute.mirrored_strategy(tf.config.list_logical_devices("CPU")[:2])
    if strategy.num_replicas_in_sync < 2:
        pytest.skip("needs two virtual CPUs")
    with strategy.scope():
        w = keras.Variable(np.ones([3], np.float32))
        opt = make_keras_optimizer(OptimizerConfig(name="adam", learning_rate=0.1), 0.1, "mirrored")
        opt.build([w])

    @tf.function
    def step():
        strategy.run(lambda: opt.apply([tf.constant([1.0, -1.0, 0.0])], [w]))

    step()
    copies = [v.numpy() for v in strategy.experimental_local_results(w.value)]
    np.testing.assert_allclose(copies[0], [0.9, 1.1, 1.0], rtol=1e-5)  # Adam's first step: -lr sign(g)
    np.testing.assert_array_equal(copies[0], copies[1])
