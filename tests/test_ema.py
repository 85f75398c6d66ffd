"""EMA: closed form on a constant-gradient toy, exact swap, replicas, frozen weights, checkpoints."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from engine import distribute
from engine.config import (Config, DataConfig, FreezeConfig, ModelConfig, OptimizerConfig,
                           TrainConfig)
from engine.data.replicas import replica_batches
from engine.ema import EMA
from engine.optimizer import make_param_groups, make_schedule
from engine.state import TrainingState, list_keys, model_variable_keys
from engine.steps import make_train_loop

LR = 0.125  # a power of two: w_t = w_0 - t * LR is exact in float32


def _sum_of_logits(labels, logits):
    return tf.reduce_sum(logits, axis=-1)


def _mse(labels, logits):
    return tf.reduce_mean(tf.square(logits - labels), axis=-1)


def _toy(strategy=None, *, decay, warmup, frozen_first=False, seed=0, one_layer=False):
    """Dense(3->4) -> Dense(4->2) (or one Dense(3->2)) with SGD and EMA, built the way
    engine/parts.py builds them."""
    strategy = strategy or tf.distribute.get_strategy()
    rng = np.random.default_rng(seed)
    cfg = OptimizerConfig(name="sgd", learning_rate=LR, schedule="constant")
    counter = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    with strategy.scope():
        inputs = keras.Input([3])
        hidden = inputs if one_layer else keras.layers.Dense(4, name="first")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(2, name="second")(hidden))
        for layer in ("second",) if one_layer else ("first", "second"):
            model.get_layer(layer).set_weights(
                [np.round(rng.normal(size=w.shape) * 8) / 8 for w in model.get_layer(layer).weights])
        keys = model_variable_keys(model)
        step = tf.Variable(0, dtype=tf.int64, **counter)
        groups = make_param_groups(cfg, {"head": list(model.trainable_variables)}, keys,
                                   make_schedule(cfg, 10, 1), step, tf.Variable(1.0, **counter))
        ema = EMA(model.weights, keys, decay, warmup, strategy)
    if frozen_first:
        model.get_layer("first").trainable = False
    return model, keys, groups, step, ema


def _loop(model, groups, step, ema, strategy=None, loss_fn=_sum_of_logits, global_batch=4):
    strategy = strategy or tf.distribute.get_strategy()
    ema.start_phase(model.trainable_variables, reset_new=True)
    loop, _ = make_train_loop(
        model=model, loss_fn=loss_fn, groups=groups,
        phase_variables={"head": list(model.trainable_variables)}, strategy=strategy,
        global_batch=global_batch, local_replicas=distribute.local_replica_count(strategy),
        global_step=step, after_step=ema.update)
    return loop


def _ones(steps, batch=4):
    x = np.ones((steps * batch, 3), np.float32)
    return iter(tf.data.Dataset.from_tensor_slices((x, np.zeros((steps * batch, 2), np.float32)))
                .batch(batch))


def _closed_form(w0, steps, decays):
    """s_T = prod(d) w_0 + sum_t (1 - d_t) prod_{k>t} d_k w_t, with w_t = w_0 - t LR."""
    d = np.asarray(decays, np.float64)
    tail = np.array([np.prod(d[t:]) for t in range(1, steps + 1)])  # prod_{k>t} d_k (t 1-based)
    t = np.arange(1, steps + 1)
    return np.prod(d) * w0 + np.sum((1 - d) * tail * (w0[..., None] - t * LR), axis=-1)


@pytest.mark.parametrize("decay,warmup", [(0.9, False), (0.7, True), (0.95, True)])
def test_shadow_equals_its_closed_form_on_a_constant_gradient(decay, warmup):
    # One Dense layer: loss = mean over the batch of sum(x W + b) with x = 1 has
    # gradient 1 for every kernel and bias entry, whatever the weights are.
    model, _, groups, step, ema = _toy(decay=decay, warmup=warmup, one_layer=True)
    w0 = [np.array(w.numpy(), np.float64) for w in model.weights]
    steps = 30
    loop = _loop(model, groups, step, ema)
    loop(_ones(steps), tf.constant(steps))

    n = np.arange(steps)
    decays = np.minimum(decay, (1 + n) / (10 + n)) if warmup else np.full(steps, decay)
    if decay == 0.7 and warmup:
        assert decays[0] < 0.7 and decays[-1] == 0.7  # both branches of the min are used
    for w, start, shadow in zip(model.weights, w0, ema.shadows):
        np.testing.assert_array_equal(w.numpy(), start - steps * LR)  # SGD on a constant gradient
        want = _closed_form(start, steps, decays)
        if not warmup:  # the textbook closed form of the same sum
            np.testing.assert_allclose(
                want, start - LR * (steps - decay * (1 - decay ** steps) / (1 - decay)), atol=1e-12)
        np.testing.assert_allclose(shadow.numpy(), want, rtol=0, atol=1e-5)
    assert int(ema.num_updates.numpy()) == steps


def test_swapped_puts_averages_in_and_restores_raw_weights_bit_identical():
    model, _, groups, step, ema = _toy(decay=0.7, warmup=True)
    x = np.random.default_rng(1).normal(size=(24, 3)).astype(np.float32)
    y = np.random.default_rng(2).normal(size=(24, 2)).astype(np.float32)
    loop = _loop(model, groups, step, ema, loss_fn=_mse)
    loop(iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(4)), tf.constant(6))
    raw = [np.array(w.numpy()) for w in model.weights]
    shadows = [np.array(s.numpy()) for s in ema.shadows]
    assert any(not np.array_equal(r, s) for r, s in zip(raw, shadows))
    with ema.swapped():
        for w, s in zip(model.weights, shadows):
            np.testing.assert_array_equal(w.numpy(), s)
        ema_out = model(x).numpy()
    for w, r in zip(model.weights, raw):
        assert w.numpy().tobytes() == r.tobytes()
    assert not np.allclose(ema_out, model(x).numpy())
    with pytest.raises(RuntimeError):  # an error inside still restores the raw weights
        with ema.swapped():
            raise RuntimeError("boom")
    for w, r in zip(model.weights, raw):
        assert w.numpy().tobytes() == r.tobytes()


def test_ema_on_two_replicas_equals_ema_on_one():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = rng.normal(size=(40, 2)).astype(np.float32)
    out = []
    for strategy in (tf.distribute.get_strategy(), distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])):
        model, _, groups, step, ema = _toy(strategy, decay=0.8, warmup=True)
        loop = _loop(model, groups, step, ema, strategy, loss_fn=_mse, global_batch=8)
        batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True)
        loop(iter(replica_batches(batches, strategy)), tf.constant(5))
        for s in ema.shadows:  # every replica holds the same average
            copies = [c.numpy() for c in strategy.experimental_local_results(s)]
            for c in copies[1:]:
                np.testing.assert_array_equal(c, copies[0])
        raw = [[c.numpy() for c in strategy.experimental_local_results(w.value)]
               for w in model.weights]
        with ema.swapped():
            pass
        for w, before in zip(model.weights, raw):  # bit-identical on every replica
            after = [c.numpy() for c in strategy.experimental_local_results(w.value)]
            for a, b in zip(after, before):
                assert a.tobytes() == b.tobytes()
        out.append(([s.numpy() for s in ema.shadows], int(ema.num_updates.numpy())))
    (one, n_one), (two, n_two) = out
    assert n_one == n_two == 5
    for a, b in zip(one, two):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


def test_frozen_weights_shadows_stay_bit_equal_and_a_thawed_weight_starts_from_its_value():
    model, _, groups, step, ema = _toy(decay=0.9, warmup=False, frozen_first=True)
    first = model.get_layer("first")
    loop = _loop(model, groups, step, ema)
    loop(_ones(7), tf.constant(7))
    frozen = [id(v) for v in first.weights]
    for w, s in zip(model.weights, ema.shadows):
        if id(w) in frozen:
            assert s.numpy().tobytes() == w.numpy().tobytes()
        else:
            assert not np.array_equal(s.numpy(), w.numpy())
    # Thaw: its average starts from the current value; the others keep theirs.
    kept = {id(w): s.numpy() for w, s in zip(model.weights, ema.shadows) if id(w) not in frozen}
    first.trainable = True
    ema.start_phase(model.trainable_variables, reset_new=True)
    for w, s in zip(model.weights, ema.shadows):
        if id(w) in frozen:
            np.testing.assert_array_equal(s.numpy(), w.numpy())
        else:
            np.testing.assert_array_equal(s.numpy(), kept[id(w)])


def test_frozen_batchnorm_statistics_keep_bit_equal_shadows():
    from engine.freeze import changing_weights
    inputs = keras.Input([4, 4, 3])
    x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(keras.layers.Flatten()(x)))
    model.get_layer("bn").trainable = False
    model.get_layer("conv").trainable = False
    keys = model_variable_keys(model)
    cfg = OptimizerConfig(name="sgd", learning_rate=0.1, schedule="constant")
    step = tf.Variable(0, dtype=tf.int64)
    groups = make_param_groups(cfg, {"head": list(model.trainable_variables)}, keys,
                               make_schedule(cfg, 10, 1), step, tf.Variable(1.0))
    ema = EMA(model.weights, keys, 0.9, True, tf.distribute.get_strategy())
    ema.start_phase(changing_weights(model), reset_new=False)
    loop, _ = make_train_loop(
        model=model, loss_fn=_mse, groups=groups,
        phase_variables={"head": list(model.trainable_variables)},
        strategy=tf.distribute.get_strategy(), global_batch=4, local_replicas=1,
        global_step=step, after_step=ema.update)
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices((rng.normal(size=(12, 4, 4, 3)).astype(np.float32),
                                               rng.normal(size=(12, 2)).astype(np.float32)))
    loop(iter(data.batch(4)), tf.constant(3))
    bn = model.get_layer("bn")
    for w in (bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta, model.get_layer("conv").kernel):
        s = ema.shadows[[id(v) for v in ema.weights].index(id(w))]
        assert s.numpy().tobytes() == w.numpy().tobytes(), w.path


def test_ema_state_round_trips_through_the_named_checkpoint(tmp_path):
    model, keys, groups, step, ema = _toy(decay=0.9, warmup=True)
    loop = _loop(model, groups, step, ema)
    loop(_ones(4), tf.constant(4))
    state = TrainingState()
    state.add_all("ema", ema.state())
    path = state.checkpoint().write(str(tmp_path / "ckpt"))
    assert set(list_keys(path)) == {f"ema/{keys[id(w)]}" for w in model.weights} | {
        "ema/_num_updates"}

    other, _, _, _, ema2 = _toy(decay=0.9, warmup=True, seed=5)
    state2 = TrainingState()
    state2.add_all("ema", ema2.state())
    report = state2.restore(path)
    assert not report.missing and not report.unused and not report.shape_mismatch
    for a, b in zip(ema.shadows, ema2.shadows):
        assert a.numpy().tobytes() == b.numpy().tobytes()
    assert int(ema2.num_updates.numpy()) == 4


def test_trainer_keeps_frozen_shadows_equal_and_resume_restores_ema_exactly(tmp_path,
                                                                           embedded_cache):
    from engine.trainer import Trainer
    config = Config(
        model=ModelConfig(backbone="tiny_cnn", input_size=32),
        data=DataConfig(cache_dir=embedded_cache),
        freeze=FreezeConfig(unfreeze_at=1),  # the one epoch trains the head only
        train=TrainConfig(model_dir=str(tmp_path / "run"), epochs=1, batch_size=16,
                          steps_per_epoch=3, ema_decay=0.9, progress=False))
    trainer = Trainer(config)
    trainer.train()
    assert int(trainer.parts.ema.num_updates.numpy()) == 3
    shadows = {k: np.array(v.numpy()) for k, v in trainer.parts.ema.state().items()}
    raw = {trainer.parts.keys[id(w)]: np.array(w.numpy()) for w in trainer.parts.model.weights}
    backbone = [k for k in raw if k.startswith("backbone/")]
    assert any("moving_mean" in k for k in backbone)
    for k in backbone:  # frozen weights (BN statistics too): shadow == weight, bit for bit
        assert shadows[k].tobytes() == raw[k].tobytes(), k
    assert not np.array_equal(shadows["head/logits/kernel"], raw["head/logits/kernel"])

    again = Trainer(config)
    assert again.restore().startswith("resumed")
    for k, v in again.parts.ema.state().items():
        assert np.array(v.numpy()).tobytes() == shadows[k].tobytes(), k
    for w in again.parts.model.weights:
        assert w.numpy().tobytes() == raw[again.parts.keys[id(w)]].tobytes()


def test_one_update_is_the_weighted_average_by_hand():
    # d = 0.75 (no warmup): shadow 0.75 s + 0.25 w, from s = [1, -2, 4], w = [3, 2, 0].
    weight = tf.Variable([3.0, 2.0, 0.0])
    ema = EMA([weight], {id(weight): "w"}, 0.75, False, tf.distribute.get_strategy())
    ema.shadows[0].assign([1.0, -2.0, 4.0])
    ema.start_phase([weight], reset_new=False)
    tf.function(ema.update)()
    np.testing.assert_allclose(ema.shadows[0].numpy(), [1.5, -1.0, 3.0], rtol=1e-6)
    np.testing.assert_array_equal(weight.numpy(), [3.0, 2.0, 0.0])
    assert int(ema.num_updates.numpy()) == 1
