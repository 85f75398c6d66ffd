"""Early stopping and reduce-LR-on-plateau as flags, with counters that survive a resume."""
import numpy as np
import pytest
import tensorflow as tf

from engine.callbacks import EpochCallbacks
from engine.config import Config, ConfigError, DataConfig, FreezeConfig, ModelConfig, \
    OptimizerConfig, TrainConfig
from engine.trainer import Trainer


def _callbacks(**kw):
    lr_scale = tf.Variable(1.0)
    return EpochCallbacks(metric="val_loss", mode="min", lr_scale=lr_scale, **kw), lr_scale


def test_plateau_and_early_stop_follow_keras_semantics():
    cb, lr_scale = _callbacks(early_stop_patience=3, plateau_patience=2, plateau_factor=0.5)
    script = [1.0, 0.8, 0.9, 0.85, 0.7, 0.75, float("nan"), 0.71]
    stops, scales = [], []
    for value in script:
        stop, _ = cb.on_epoch_end({"val_loss": value})
        stops.append(stop)
        scales.append(float(lr_scale.numpy()))
    # plateau: 2 epochs without beating 0.8 -> x0.5 after epoch 4; again after 0.7's epochs 6, 7
    assert scales == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    # early stop: 0.7 at epoch 5, then 3 epochs without improvement (NaN counts as none)
    assert stops == [False] * 7 + [True]
    assert float(cb.early.best.numpy()) == 0.7 and int(cb.early.wait.numpy()) == 3


def test_max_mode_and_missing_metric():
    lr_scale = tf.Variable(1.0)
    cb = EpochCallbacks(metric="val_auc", mode="max", lr_scale=lr_scale, early_stop_patience=2)
    assert cb.on_epoch_end({"val_auc": 0.5})[0] is False
    assert cb.on_epoch_end({"val_auc": 0.6})[0] is False
    assert cb.on_epoch_end({})[0] is False  # no metric: no improvement
    stop, lines = cb.on_epoch_end({"val_auc": 0.55})
    assert stop and "val_auc has not improved on 0.6000 for 2 epochs" in lines[0]


def test_config_names_the_flags():
    for fields, flag in (({"plateau_factor": 1.5}, "--plateau_factor"),
                         ({"early_stop_patience": -1}, "--early_stop_patience"),
                         ({"bad_step_lr_factor": 0.0}, "--bad_step_lr_factor"),
                         ({"histogram_every": -2}, "--histogram_every")):
        with pytest.raises(ConfigError, match=flag):
            Config().replace(train=fields)
    with pytest.raises(ConfigError, match="--clipvalue"):
        Config().replace(optimizer={"clipvalue": -1.0})


def _config(tmp_path, cache, epochs):
    return Config(model=ModelConfig(backbone="tiny_cnn", input_size=32),
                  data=DataConfig(cache_dir=cache),
                  optimizer=OptimizerConfig(name="momentum", learning_rate=0.05,
                                            schedule="constant"),
                  freeze=FreezeConfig(unfreeze_at=0),
                  train=TrainConfig(model_dir=str(tmp_path / "run"), epochs=epochs, batch_size=16,
                                    steps_per_epoch=2, steps_per_loop=2, progress=False,
                                    early_stop_patience=2, plateau_patience=1,
                                    plateau_factor=0.5, summary_every=0))


class _ScriptedTrainer(Trainer):
    """A Trainer whose validation is a scripted val_loss per epoch (what the callbacks watch)."""

    def __init__(self, config, val_losses):
        super().__init__(config)
        self.val_losses = iter(val_losses)

    def evaluate(self, save=True):
        return {"val_loss": next(self.val_losses)}


def test_callbacks_stop_the_trainer_and_their_counters_resume(tmp_path, embedded_cache):
    trainer = _ScriptedTrainer(_config(tmp_path, embedded_cache, epochs=3), [0.5, 0.6, 0.7])
    trainer.train()
    # epoch 2 and 3 do not improve: plateau halves the LR after each, early stop waits 2
    assert float(trainer.parts.counters.lr_scale.numpy()) == 0.25
    assert int(trainer.parts.callbacks.early.wait.numpy()) == 2
    saved = {k: v for k, v in trainer.parts.state.values().items() if k.startswith("train/")}
    assert {"train/early_stop_wait", "train/plateau_wait", "train/early_stop_best",
            "train/plateau_best", "train/bad_steps", "train/rollbacks"} <= set(saved)

    again = Trainer(_config(tmp_path, embedded_cache, epochs=6))  # more epochs asked for
    again.restore()
    for key, value in saved.items():
        np.testing.assert_array_equal(again.parts.state.values()[key], value, err_msg=key)
    lines = []
    again.parts.log.listeners.append(lines.append)
    assert again.train() == {}
    # it had stopped early: nothing more is trained
    assert int(again.parts.counters.epoch.numpy()) == 3
    assert any("early stop: val_loss has not improved on 0.5000 for 2 epochs" in l for l in lines)


def test_early_stop_ends_the_run_before_its_last_epoch(tmp_path, embedded_cache):
    trainer = _ScriptedTrainer(_config(tmp_path, embedded_cache, epochs=5),
                               [0.5, 0.4, 0.45, 0.41, 0.3])
    trainer.train()
    assert int(trainer.parts.counters.epoch.numpy()) == 4  # stopped after epoch 4 of 5
    assert float(trainer.parts.counters.lr_scale.numpy()) == 0.25  # plateau after epochs 3 and 4
