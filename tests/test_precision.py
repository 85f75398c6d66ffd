"""Mixed precision in the custom loop: the policy while building, float16 loss scaling."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from engine import freeze
from engine.config import Config, DataConfig, FreezeConfig, ModelConfig, OptimizerConfig, TrainConfig
from engine.precision import DynamicLossScale, policy_scope
from engine.trainer import Trainer


def test_loss_scale_halves_on_overflow_doubles_after_the_interval_and_stops_at_one():
    s = DynamicLossScale(initial=8.0, growth_interval=3, minimum=1.0)
    seen = []
    for finite in [True, True, False, True, True, True, False, False, False, False, False]:
        s.update(tf.constant(finite))
        seen.append((float(s.scale.numpy()), int(s.good_steps.numpy())))
    assert seen == [(8, 1), (8, 2), (4, 0), (4, 1), (4, 2), (8, 0),  # grows on the 3rd good step
                    (4, 0), (2, 0), (1, 0), (1, 0), (1, 0)]          # floors at the minimum
    # overflows counted only while the scale could still shrink (8->4, 8->4->2->1)
    assert int(s.overflow_steps.numpy()) == 4
    assert bool(s.is_overflow(tf.constant(False)).numpy()) is False  # at 1: a real bad step


def test_policy_scope_restores_the_global_policy():
    with policy_scope("float16"):
        assert keras.config.dtype_policy().name == "mixed_float16"
        layer = keras.layers.Dense(2)
    assert keras.config.dtype_policy().name == "float32"
    assert layer.dtype_policy.name == "mixed_float16"  # taken at creation


def _config(tmp_path, cache, precision):
    return Config(model=ModelConfig(backbone="tiny_cnn", input_size=32),
                  data=DataConfig(cache_dir=cache),
                  optimizer=OptimizerConfig(name="sgd", learning_rate=0.05, schedule="constant"),
                  freeze=FreezeConfig(unfreeze_at=0),
                  train=TrainConfig(model_dir=str(tmp_path / precision), epochs=3, batch_size=16,
                                    steps_per_epoch=8, steps_per_loop=4, progress=False,
                                    mixed_precision=precision, summary_every=0))


def _weights(trainer):
    return [np.array(v.numpy()) for v in trainer.parts.model.trainable_variables]


def test_float16_trains_like_float32_and_an_overflow_is_skipped_not_counted_bad(
        tmp_path, embedded_cache):
    runs = {}
    for precision in ("float32", "float16"):
        trainer = Trainer(_config(tmp_path, embedded_cache, precision))
        trainer.restore()
        trainer.enter_phase(freeze.UNFROZEN)
        runs[precision] = (trainer, [trainer.run_epoch()["loss"] for _ in range(2)])
    assert keras.config.dtype_policy().name == "float32"  # the Trainer left it as it was
    t16, losses16 = runs["float16"]
    _, losses32 = runs["float32"]
    conv = t16.parts.model.get_layer("backbone").layers[1]
    assert conv.compute_dtype == "float16" and conv.variable_dtype == "float32"
    assert all(np.isfinite(losses16)) and losses16[1] < losses16[0]
    np.testing.assert_allclose(losses16, losses32, rtol=0.02)  # same run, float16 compute
    assert float(t16.parts.loss_scale.scale.numpy()) == 2.0 ** 15  # no overflow in 16 steps
    assert int(t16.parts.loss_scale.good_steps.numpy()) == 16

    # A scale far too large overflows float16 in the backward pass: the step changes
    # nothing, the scale halves, and the guard does not count it as a bad step.
    t16.parts.loss_scale.scale.assign(2.0 ** 40)
    before = _weights(t16)
    steps_before = int(t16.parts.counters.global_step.numpy())
    loss, _ = t16.train_loop(iter(t16.parts.data.train_dataset(
        epoch=5, global_batch=16, input_size=32, seed=0)), tf.constant(1, tf.int32))
    assert np.isnan(float(loss))  # no good step in this call
    for a, b in zip(before, _weights(t16)):
        np.testing.assert_array_equal(a, b)
    assert float(t16.parts.loss_scale.scale.numpy()) == 2.0 ** 39
    assert int(t16.parts.loss_scale.overflow_steps.numpy()) == 1
    guard = t16.parts.guard
    assert int(guard.bad_steps.numpy()) == 0 and int(guard.consecutive.numpy()) == 0
    assert int(t16.parts.counters.global_step.numpy()) == steps_before + 1


def test_the_loss_scale_is_checkpoint_state_and_resumes(tmp_path, embedded_cache):
    cfg = _config(tmp_path, embedded_cache, "float16")
    first = Trainer(cfg)
    first.train()
    first.parts.loss_scale.scale.assign(1024.0)
    first.checkpointer.save_rolling()
    assert {"train/loss_scale", "train/loss_scale_good_steps", "train/overflow_steps"} <= set(
        first.parts.state.keys)
    again = Trainer(cfg)
    assert again.restore().startswith("resumed")
    assert float(again.parts.loss_scale.scale.numpy()) == 1024.0
    assert (int(again.parts.loss_scale.good_steps.numpy())
            == int(first.parts.loss_scale.good_steps.numpy()))


def test_float32_runs_have_no_loss_scale_state(tmp_path, embedded_cache):
    trainer = Trainer(_config(tmp_path, embedded_cache, "float32"))
    assert trainer.parts.loss_scale is None
    assert not [k for k in trainer.parts.state.keys if "loss_scale" in k]
