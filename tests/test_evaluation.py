"""engine/evaluation.py through the trainer: per-label reports and collapse warnings."""
import csv
import os

import keras
import numpy as np
import pytest

from engine import freeze
from engine.collapse import GradientVanishingMonitor
from engine.config import Config, DataConfig, FreezeConfig, ModelConfig, OptimizerConfig, TrainConfig
from engine.data.embedded import LABEL_NAMES
from engine.metrics import read_thresholds
from engine.trainer import Trainer

PER_LABEL = ("precision", "recall", "f2", "f2_at_0.5", "auc", "threshold")


def _config(tmp_path, cache, **train):
    t = dict(model_dir=str(tmp_path / "run"), epochs=1, batch_size=16, steps_per_epoch=6,
             steps_per_loop=3, progress=False)
    t.update(train)
    return Config(model=ModelConfig(backbone="tiny_cnn", input_size=32),
                  data=DataConfig(cache_dir=cache), freeze=FreezeConfig(unfreeze_at=0),
                  optimizer=OptimizerConfig(name="adam", learning_rate=0.003, schedule="constant"),
                  train=TrainConfig(**t))


def test_healthy_short_run_reports_per_label_and_stays_silent(tmp_path, embedded_cache, capsys):
    trainer = Trainer(_config(tmp_path, embedded_cache, epochs=2, steps_per_epoch=10, steps_per_loop=5))
    result = trainer.train()
    out = capsys.readouterr().out

    # the epoch line and the CSV get the summary keys only
    assert {k for k in result if k.startswith("val")} == {
        "val_loss", "val_macro_auc", "val_f2_samples_at_0.5", "val_f2_samples"}
    with open(os.path.join(trainer.parts.model_dir, "metrics.csv")) as f:
        header = next(csv.reader(f))
    assert not any("/" in h for h in header) and len(header) == 8
    # TensorBoard gets every label's precision, recall, F2, AUC and threshold
    scalars = trainer.parts.evaluation.label_scalars()
    for name in LABEL_NAMES:
        for what in PER_LABEL:
            assert f"val_{what}/{name}" in scalars
    assert 0.0 <= scalars["val_auc/sky_band"] <= 1.0
    assert "val_f2_macro" in scalars
    # the table: one line per label, after each of the two evaluations
    assert out.count("val per label (F2 at thresholds searched on val") == 2
    for name in LABEL_NAMES:
        assert out.count(f"  {name} ") == 2
    # a healthy run: no warning at start, none from the gradient monitor, none after eval
    assert trainer.parts.evaluation.warnings == []
    assert "WARNING" not in out


def test_constant_head_is_reported_as_collapsed(tmp_path, embedded_cache, capsys):
    trainer = Trainer(_config(tmp_path, embedded_cache))
    trainer.restore()  # the head bias starts at each label's prior
    logits = trainer.parts.model.get_layer("head").get_layer("logits")
    logits.kernel.assign(np.zeros(logits.kernel.shape, np.float32))
    bias = logits.bias.numpy()
    bias[-1] = -12.0  # one label pushed to "never"
    logits.bias.assign(bias)
    trainer.evaluate()
    warnings = trainer.parts.evaluation.warnings
    assert len(warnings) == len(LABEL_NAMES)
    assert all(w.startswith("val: label '") for w in warnings)
    assert sum("barely vary" in w for w in warnings) == len(LABEL_NAMES) - 1
    assert "'checkerboard': predictions sit at ~0" in warnings[-1]
    assert "--pos_weight=auto" in warnings[0]
    out = capsys.readouterr().out  # many collapsed labels: one line names them all
    assert out.count("WARNING:") == 1
    assert f"WARNING: val: the predictions of {len(LABEL_NAMES)} labels look collapsed " \
           f"({', '.join(LABEL_NAMES)}); the first: label 'green_field'" in out


def test_sigmoid_head_warns_at_start_and_gradients_vanish(tmp_path, embedded_cache):
    # A head that squashes its output and is saturated: sigmoid(30) is 1.0 in float32. Its
    # weights come in by a warm start, which (unlike a fresh start) keeps the file's bias.
    saturated = Trainer(_config(tmp_path / "a", embedded_cache))
    logits = saturated.parts.model.get_layer("head").get_layer("logits")
    logits.kernel.assign(np.zeros(logits.kernel.shape, np.float32))
    logits.bias.assign(np.full(logits.bias.shape, 30.0, np.float32))
    saturated.parts.model.save_weights(str(tmp_path / "saturated.weights.h5"))
    trainer = Trainer(_config(tmp_path, embedded_cache, steps_per_epoch=8, steps_per_loop=2,
                              init_checkpoint=str(tmp_path / "saturated.weights.h5")))
    trainer.parts.model.get_layer("head").get_layer("logits").activation = keras.activations.sigmoid
    trainer.parts.evaluation.grad_monitor = GradientVanishingMonitor(floor=1e-7, patience=6)
    trainer.train()
    warnings = trainer.parts.evaluation.warnings
    assert "applies sigmoid" in warnings[0] and "'logits'" in warnings[0]
    vanishing = [w for w in warnings if "gradient norm stayed below" in w]
    assert len(vanishing) == 1 and "6 steps" in vanishing[0]
    assert sum("barely vary" in w for w in warnings) == len(LABEL_NAMES)


def test_observe_grad_norm_counts_steps_of_a_call(tmp_path, embedded_cache):
    trainer = Trainer(_config(tmp_path, embedded_cache))
    ev = trainer.parts.evaluation
    ev.grad_monitor = GradientVanishingMonitor(floor=1e-7, patience=10)
    assert ev.observe_grad_norm(1e-9, steps=5) == []
    assert ev.observe_grad_norm(1.0, steps=5) == []  # a real gradient restarts the count
    assert ev.observe_grad_norm(0.0, steps=9) == []
    fired = ev.observe_grad_norm(0.0, steps=4, step=13)
    assert len(fired) == 1 and "step 13" in fired[0] and ev.warnings == fired


def test_ema_pass_saves_its_own_thresholds_naming_objective_and_weights(tmp_path, embedded_cache):
    """Export serves the EMA weights, so their thresholds are searched and kept too."""
    trainer = Trainer(_config(tmp_path, embedded_cache, ema_decay=0.9,
                              threshold_objective="samples"))
    trainer.restore()
    shadows = trainer.parts.ema.state()  # EMA logits 2 lower than raw: other thresholds fit
    bias = next(k for k in shadows if k.endswith("logits/bias"))
    shadows[bias].assign(shadows[bias] - 2.0)
    trainer.evaluate()
    ev = trainer.parts.evaluation
    raw = read_thresholds(os.path.join(trainer.parts.model_dir, "thresholds.json"), LABEL_NAMES)
    ema = read_thresholds(os.path.join(trainer.parts.model_dir, "thresholds_ema.json"), LABEL_NAMES)
    assert (raw.objective, raw.weights) == ("samples", "raw")
    assert (ema.objective, ema.weights) == ("samples", "ema")
    np.testing.assert_array_equal(raw.thresholds, ev.thresholds["val"])
    np.testing.assert_array_equal(ema.thresholds, ev.thresholds["val_ema"])
    assert np.abs(raw.thresholds - ema.thresholds).max() > 0.05
    assert ev.tables["val_ema"][0].startswith(
        "val_ema per label (F2 at thresholds searched on val_ema for the mean per-image F2 "
        "(--threshold_objective=samples)")
