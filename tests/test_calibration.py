"""BN calibration (engine/calibration.py): precise statistics, nothing else changed, once a run."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine import calibration, distribute
from engine.calibration import BNCalibrator, batchnorm_layers
from engine.config import AUTO_CALIBRATE_BN_STEPS, Config, DataConfig, FreezeConfig, ModelConfig, \
    OptimizerConfig, TrainConfig
from engine.state import TrainingState
from engine.trainer import Trainer
from models import build_model
from models.backbones import set_synchronized_bn


def _dense_bn_model(seed=0):
    """x -> Dense -> BN -> ReLU -> Dropout -> Dense -> BN: every statistic computable in numpy."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(4, name="d1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1", momentum=0.99)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(0.3, name="drop")(x)  # its seed state must come back as it was
    x = keras.layers.Dense(3, name="d2")(x)
    x = keras.layers.BatchNormalization(name="bn2", momentum=0.9)(x)
    return keras.Model(inputs, x)


def _by_hand(model, batches):
    """Per-batch mean and biased variance at each BN input, averaged over batches (numpy)."""
    w1, b1 = (v.numpy() for v in model.get_layer("d1").weights)
    w2, b2 = (v.numpy() for v in model.get_layer("d2").weights)
    bn1 = model.get_layer("bn1")
    gamma, beta = bn1.gamma.numpy(), bn1.beta.numpy()
    stats = {"bn1": [], "bn2": []}
    for x, _ in batches:
        h = x.astype(np.float64) @ w1 + b1
        stats["bn1"].append((h.mean(0), h.var(0)))
        h = (h - h.mean(0)) / np.sqrt(h.var(0) + bn1.epsilon) * gamma + beta
        # (the test sets the dropout rate to 0: ReLU is all that follows)
        h = np.maximum(h, 0) @ w2 + b2
        stats["bn2"].append((h.mean(0), h.var(0)))
    return {k: (np.mean([m for m, _ in v], 0), np.mean([s for _, s in v], 0))
            for k, v in stats.items()}


def _batches(n, batch=16, dim=5, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.normal(3.0, 2.0, (batch, dim)).astype(np.float32), np.zeros((batch, 1), np.float32))
            for _ in range(n)]


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def test_statistics_are_the_average_of_the_batch_statistics():
    model = _dense_bn_model()
    model.get_layer("drop").rate = 0.0  # numpy cannot replay TF's dropout mask
    model.get_layer("bn1").trainable = False  # frozen BN is calibrated too, and stays frozen
    batches = _batches(5)
    done = BNCalibrator(model)(iter(batches), steps=4)  # only the first four are used
    assert done == 4
    expected = _by_hand(model, batches[:4])
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        np.testing.assert_allclose(layer.moving_mean.numpy(), expected[name][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), expected[name][1], rtol=1e-4)
    assert model.get_layer("bn1").momentum == 0.99 and model.get_layer("bn2").momentum == 0.9
    assert model.get_layer("bn1").trainable is False and model.get_layer("bn2").trainable


def test_calibration_changes_only_the_moving_statistics():
    model = _dense_bn_model()  # dropout on: its seed-generator state is written by the passes
    layers = batchnorm_layers(model)
    stats = {id(v) for l in layers for v in (l.moving_mean, l.moving_variance)}
    others = [v for v in model.variables if id(v) not in stats]
    assert any(not tf.as_dtype(v.dtype).is_floating for v in others)  # the seed state is there
    before = _values(others)
    BNCalibrator(model)(iter(_batches(3)), steps=3)
    for a, b in zip(before, _values(others)):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(layers[0].moving_variance.numpy(), 1.0)


def test_zero_steps_changes_nothing():
    model = _dense_bn_model()
    before = _values(model.variables)
    assert BNCalibrator(model)(iter(_batches(2)), steps=0) == 0
    for a, b in zip(before, _values(model.variables)):
        np.testing.assert_array_equal(a, b)


def test_two_replicas_with_sync_bn_equal_one_device():
    """Each replica runs its slice in strategy.run; synchronized BN sees the global batch."""
    images = [tf.random.stateless_uniform([8, 16, 16, 3], [i, 0], 0, 255) for i in range(3)]
    batches = [(x, tf.zeros([8, 13])) for x in images]
    one = build_model("tiny_cnn", 16, 13, seed=0)
    BNCalibrator(one)(iter(batches), steps=3)
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])  # fresh collective keys
    with strategy.scope():
        two = build_model("tiny_cnn", 16, 13, seed=0)
        set_synchronized_bn(two)
    BNCalibrator(two, strategy=strategy, local_replicas=2)(iter(batches), steps=3)
    for a, b in zip(batchnorm_layers(one), batchnorm_layers(two)):
        for va, vb in ((a.moving_mean, b.moving_mean), (a.moving_variance, b.moving_variance)):
            for replica_value in strategy.experimental_local_results(vb.value):
                np.testing.assert_allclose(replica_value.numpy(), va.numpy(), rtol=2e-3, atol=1e-4)


def test_auto_steps_calibrate_a_random_init_only():
    assert Config().bn_calibration_steps() == AUTO_CALIBRATE_BN_STEPS
    assert Config(model=ModelConfig(weights="w.h5")).bn_calibration_steps() == 0
    assert Config(train=TrainConfig(init_checkpoint="runs/x")).bn_calibration_steps() == 0
    assert Config(train=TrainConfig(calibrate_bn_steps=0)).bn_calibration_steps() == 0
    assert Config(model=ModelConfig(weights="w.h5"),
                  train=TrainConfig(calibrate_bn_steps=7)).bn_calibration_steps() == 7


# ------------------------------------------------------------------ trainer
def _config(tmp_path, cache, **train):
    t = dict(model_dir=str(tmp_path / "run"), epochs=1, batch_size=16, steps_per_epoch=3,
             steps_per_loop=3, progress=False, calibrate_bn_steps=3, ema_decay=0.5)
    t.update(train)
    return Config(model=ModelConfig(backbone="tiny_cnn", input_size=16, dropout=0.2),
                  data=DataConfig(cache_dir=cache),
                  optimizer=OptimizerConfig(name="momentum", learning_rate=0.05),
                  freeze=FreezeConfig(unfreeze_at=t.pop("unfreeze_at", 1)), train=TrainConfig(**t))


def _bn_statistics(trainer):
    return [v for l in batchnorm_layers(trainer.parts.model)
            for v in (l.moving_mean, l.moving_variance)]


def test_trainer_calibrates_once_before_the_frozen_phase_and_a_resume_skips_it(
        tmp_path, embedded_cache, capsys):
    first = Trainer(_config(tmp_path, embedded_cache))  # one frozen epoch: BN stays put after
    first.train()
    assert "BN calibration" in capsys.readouterr().out
    assert int(first.parts.counters.bn_calibrated.numpy()) == 3
    assert not np.allclose(batchnorm_layers(first.parts.model)[0].moving_variance.numpy(), 1.0)
    # EMA shadows start from the calibrated statistics (frozen: they stay equal).
    shadows = first.parts.ema.state()
    for v in _bn_statistics(first):
        np.testing.assert_array_equal(shadows[first.parts.keys[id(v)]].numpy(), v.numpy())
    # The statistics are those of the run's first three training batches.
    c = first.parts.config
    fresh = build_model("tiny_cnn", 16, 13, seed=0, dropout=0.2, bn_momentum=c.model.bn_momentum)
    BNCalibrator(fresh)(calibration.training_batches(
        first.parts.data, steps=3, global_batch=16, input_size=16, seed=0, augment=True), steps=3)
    for a, b in zip(_bn_statistics(first), [v for l in batchnorm_layers(fresh)
                                            for v in (l.moving_mean, l.moving_variance)]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)

    # A resume asking for 5 calibration batches: calibrating again would log
    # it, record 5 and change the statistics (5 batches, not 3); none happens.
    calibrated = _values(_bn_statistics(first))
    again = Trainer(_config(tmp_path, embedded_cache, calibrate_bn_steps=5))
    again.train()  # restores, then finds the one epoch done: nothing trains
    out = capsys.readouterr().out
    assert "resumed: " in out and "BN calibration" not in out
    assert "--calibrate_bn_steps: 3 -> 5 (no effect on resume" in out
    assert int(again.parts.counters.bn_calibrated.numpy()) == 3
    for a, b in zip(calibrated, _values(_bn_statistics(again))):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_from_before_calibration_existed_is_resumed_without_it(
        tmp_path, embedded_cache, capsys):
    first = Trainer(_config(tmp_path, embedded_cache, calibrate_bn_steps=0))
    first.train()
    old = TrainingState()  # the same state without train/bn_calibrated, saved as the newest
    for key in first.parts.state.keys:
        if key != "train/bn_calibrated":
            old.add(key, first.parts.state[key])
    first.parts.counters.global_step.assign_add(1)
    tf.train.CheckpointManager(old.checkpoint(), os.path.join(first.parts.model_dir, "checkpoints"),
                               max_to_keep=5).save(
        checkpoint_number=int(first.parts.counters.global_step.numpy()))

    capsys.readouterr()
    again = Trainer(_config(tmp_path, embedded_cache, epochs=2))  # calibrate_bn_steps=3
    again.train()
    out = capsys.readouterr().out
    assert "resumed: " in out and "BN calibration" not in out
    assert int(again.parts.counters.bn_calibrated.numpy()) == -1  # 3 had it calibrated now


def test_zero_steps_leave_the_statistics_and_record_it(tmp_path, embedded_cache):
    trainer = Trainer(_config(tmp_path, embedded_cache, calibrate_bn_steps=0))
    trainer.train()
    assert int(trainer.parts.counters.bn_calibrated.numpy()) == -1
    for layer in batchnorm_layers(trainer.parts.model.get_layer("backbone")):
        np.testing.assert_array_equal(layer.moving_mean.numpy(), 0.0)
        np.testing.assert_array_equal(layer.moving_variance.numpy(), 1.0)


def test_ema_calibrate_bn_evaluates_calibrated_ema_and_restores_the_raw_state(
        tmp_path, embedded_cache):
    trainer = Trainer(_config(tmp_path, embedded_cache, unfreeze_at=0, ema_calibrate_bn=True))
    trainer.train()  # one unfrozen epoch: shadows differ from the weights
    before = _values(trainer.parts.model.variables)
    calibrated = trainer.evaluate()
    for a, b in zip(before, _values(trainer.parts.model.variables)):
        np.testing.assert_array_equal(a, b)  # weights, BN statistics, dropout seed state
    same_run = Trainer(_config(tmp_path, embedded_cache, unfreeze_at=0, ema_calibrate_bn=False))
    same_run.restore()
    plain = same_run.evaluate()
    assert calibrated["val_loss"] == plain["val_loss"]  # the raw model is not touched
    assert calibrated["val_ema_loss"] != plain["val_ema_loss"]
