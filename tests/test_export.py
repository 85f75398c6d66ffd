"""--mode=export: a SavedModel that serves what was validated.

The run used here is written by hand, so it is fast and its facts are known:
best/ holds step 5 and checkpoints/ steps 5 and 9 (the best epoch is not the
last), and the EMA weights differ from the raw ones enough that their
thresholds differ too.
"""
import json
import os
import stat
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine.calibration import BNCalibrator, training_batches
from engine.config import Config, DataConfig, ModelConfig, TrainConfig
from engine.export import export_saved_model
from engine.metrics import read_thresholds
from engine.state import StateError

SIZE = 32


def _config(model_dir, cache, **train):
    train = {"ema_decay": 0.9, **train}
    return Config(model=ModelConfig(backbone="tiny_cnn", input_size=SIZE),
                  data=DataConfig(cache_dir=cache),
                  train=TrainConfig(model_dir=str(model_dir), epochs=1, batch_size=16,
                                    steps_per_epoch=3, progress=False, **train))


@pytest.fixture(scope="module")
def run(tmp_path_factory, embedded_cache):
    """A tiny_cnn run dir: best/ckpt-5 (best_metric 0.25) and checkpoints/ckpt-5, ckpt-9.

    The EMA logits sit 2 below the raw ones (other probabilities, so other
    thresholds); step 9 has other weights again (its head kernel x3).
    """
    from engine.trainer import Trainer
    config = _config(tmp_path_factory.mktemp("export_run"), embedded_cache)
    trainer = Trainer(config)
    trainer.restore()  # fresh: head bias at the label priors
    shadows = trainer.parts.ema.state()
    bias = next(k for k in shadows if k.endswith("logits/bias"))
    shadows[bias].assign(shadows[bias] - 2.0)
    trainer.parts.counters.global_step.assign(5)
    trainer.parts.counters.best.assign(0.25)
    trainer.checkpointer.best.save(checkpoint_number=5)
    trainer.checkpointer.rolling.save(checkpoint_number=5)
    kernel = trainer.parts.model.get_layer("head").get_layer("logits").kernel
    kernel.assign(kernel * 3.0)
    trainer.parts.counters.global_step.assign(9)
    trainer.checkpointer.rolling.save(checkpoint_number=9)
    return config, trainer


def _checkpoint(trainer, which):
    return os.path.join(trainer.parts.model_dir, which)


def _images(n=6, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _exported_dir(line):
    return line.split(" to ", 1)[1].split(" (", 1)[0]


def _as_of(trainer, path, ema):
    """The trainer's model restored from path, EMA swapped in or not: (probabilities, thresholds).

    Thresholds through the trainer's own validation pass (Evaluation), not
    through export's code.
    """
    trainer.parts.state.restore(path)
    images = _images()
    if ema:
        with trainer.parts.ema.swapped():
            trainer.parts.evaluation.run("check", save=False, report=False)
            probs = _sigmoid(trainer.parts.model(images, training=False).numpy())
    else:
        trainer.parts.evaluation.run("check", save=False, report=False)
        probs = _sigmoid(trainer.parts.model(images, training=False).numpy())
    return probs, trainer.parts.evaluation.thresholds["check"]


def _serve(target, images):
    return tf.saved_model.load(target).signatures["serving_default"](images=tf.constant(images))


def test_default_export_is_best_with_ema_and_serves_the_ema_thresholds(run):
    config, trainer = run
    line = export_saved_model(config)
    best = _checkpoint(trainer, "best/ckpt-5")
    target = os.path.join(trainer.parts.model_dir, "export", "5")
    assert line.startswith(f"exported EMA weights of step 5 from {best} "
                           f"(best by --best_metric, 0.25) to {target} ")
    assert "--threshold_objective=per_label" in line
    assert _exported_dir(line) == target
    want_probs, ema_thresholds = _as_of(trainer, best, ema=True)
    _, raw_thresholds = _as_of(trainer, best, ema=False)
    assert np.abs(ema_thresholds - raw_thresholds).max() > 0.05  # the case the issue saw

    out = _serve(target, _images())
    assert set(out) == {"probabilities", "decisions"}
    probs = out["probabilities"].numpy()
    np.testing.assert_allclose(probs, want_probs, rtol=0, atol=1e-5)
    served = tf.saved_model.load(target).thresholds.numpy()
    np.testing.assert_allclose(served, ema_thresholds, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["decisions"].numpy(),
                                  (probs >= served).astype(np.float32))
    copy = read_thresholds(os.path.join(target, "thresholds.json"), trainer.parts.data.label_names)
    assert (copy.objective, copy.weights, copy.metadata["step"]) == ("per_label", "ema", 5)
    np.testing.assert_allclose(copy.thresholds, ema_thresholds, rtol=0, atol=1e-6)
    assert not [p for p in os.listdir(os.path.dirname(target)) if p.startswith(".")]  # no scratch


def test_export_from_latest_and_from_a_path(run):
    config, trainer = run
    latest = _checkpoint(trainer, "checkpoints/ckpt-9")
    line = export_saved_model(config.replace(train={"export_from": "latest"}))
    assert line.startswith(f"exported EMA weights of step 9 from {latest} (latest) to ")
    want, _ = _as_of(trainer, latest, ema=True)
    np.testing.assert_allclose(_serve(_exported_dir(line), _images())["probabilities"].numpy(),
                               want, rtol=0, atol=1e-5)
    older = _checkpoint(trainer, "checkpoints/ckpt-5")
    line = export_saved_model(config.replace(train={"export_from": older}))
    assert line.startswith(f"exported EMA weights of step 5 from {older} (--export_from) to ")
    with pytest.raises(StateError, match=r"^--export_from=.*ckpt-7 is not a readable checkpoint"):
        export_saved_model(config.replace(train={"export_from": older[:-1] + "7"}))


def test_ema_calibrate_bn_exports_statistics_measured_with_the_ema_weights(run):
    config, trainer = run
    line = export_saved_model(config.replace(train={"ema_calibrate_bn": True,
                                                     "calibrate_bn_steps": 2}))
    assert "BN statistics re-estimated for the EMA weights over 2 training batches" in line
    best = _checkpoint(trainer, "best/ckpt-5")
    uncalibrated, _ = _as_of(trainer, best, ema=True)
    with trainer.parts.ema.swapped():
        BNCalibrator(trainer.parts.model)(training_batches(
            trainer.parts.data, steps=2, global_batch=16, input_size=SIZE, seed=0, augment=True), 2)
        want = _sigmoid(trainer.parts.model(_images(), training=False).numpy())
    served = _serve(_exported_dir(line), _images())["probabilities"].numpy()
    np.testing.assert_allclose(served, want, rtol=0, atol=1e-5)
    assert np.abs(served - uncalibrated).max() > 1e-3


def test_export_raw_serves_the_raw_weights_and_thresholds(run):
    config, trainer = run
    line = export_saved_model(config.replace(train={"export_raw": True}))
    assert line.startswith("exported raw weights of step 5 from ")
    want, raw_thresholds = _as_of(trainer, _checkpoint(trainer, "best/ckpt-5"), ema=False)
    target = _exported_dir(line)
    np.testing.assert_allclose(_serve(target, _images())["probabilities"].numpy(), want,
                               rtol=0, atol=1e-5)
    loaded = tf.saved_model.load(target)
    np.testing.assert_allclose(loaded.thresholds.numpy(), raw_thresholds, rtol=0, atol=1e-6)
    assert loaded.weights.numpy() == b"raw"


def test_labels_and_thresholds_travel_inside_the_saved_model(run):
    config, trainer = run
    target = _exported_dir(export_saved_model(config))
    loaded = tf.saved_model.load(target)
    names = [n.decode() for n in loaded.label_names.numpy()]
    assert names == trainer.parts.data.label_names
    meta = loaded.signatures["metadata"]()
    assert [n.decode() for n in meta["label_names"].numpy()] == names
    assert meta["thresholds"].shape == (len(names),)
    assert meta["weights"].numpy() == b"ema" and int(meta["step"].numpy()) == 5
    assert meta["threshold_objective"].numpy() == b"per_label"
    with open(os.path.join(target, "labels.txt")) as f:
        assert f.read().splitlines() == names


def test_exported_files_are_readable_by_other_users(run):
    config, trainer = run
    old = os.umask(0o077)  # even a private umask: the export is for a serving user
    try:
        target = _exported_dir(export_saved_model(config))
    finally:
        os.umask(old)
    modes = {}
    for directory, subdirs, files in os.walk(target):
        modes[directory] = stat.S_IMODE(os.stat(directory).st_mode)
        for name in files:
            modes[os.path.join(directory, name)] = stat.S_IMODE(
                os.stat(os.path.join(directory, name)).st_mode)
    assert os.path.join(target, "thresholds.json") in modes
    assert os.path.join(target, "model.keras") in modes
    assert os.path.join(target, "saved_model.pb") in modes
    assert {p: m for p, m in modes.items() if m != (0o755 if os.path.isdir(p) else 0o644)} == {}
    assert stat.S_IMODE(os.stat(os.path.dirname(target)).st_mode) == 0o755


def test_saved_model_cli_lists_the_signatures(run):
    config, trainer = run
    target = _exported_dir(export_saved_model(config))
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        pytest.skip("saved_model_cli is not installed next to this python")
    shown = subprocess.run([cli, "show", "--dir", target, "--all"], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert shown.returncode == 0, shown.stderr[-2000:]
    text = shown.stdout
    assert "signature_def['serving_default']" in text
    assert "signature_def['metadata']" in text
    for name in ("inputs['images']", "outputs['probabilities']", "outputs['decisions']",
                 "outputs['label_names']", "(-1, 32, 32, 3)", "DT_FLOAT"):
        assert name in text, name


def test_export_without_a_checkpoint_names_model_dir(tmp_path, embedded_cache):
    with pytest.raises(StateError, match=r"^--model_dir=.*no checkpoint"):
        export_saved_model(_config(tmp_path / "empty", embedded_cache))


def test_export_of_a_run_without_ema_asks_for_export_raw(tmp_path, embedded_cache):
    from engine.trainer import Trainer
    plain = Trainer(_config(tmp_path / "plain", embedded_cache, ema_decay=0.0))
    plain.checkpointer.rolling.save(checkpoint_number=0)  # an untrained checkpoint without EMA shadows
    with pytest.raises(StateError, match="--export_raw"):
        export_saved_model(_config(tmp_path / "plain", embedded_cache))
    line = export_saved_model(_config(tmp_path / "plain", embedded_cache, export_raw=True))
    # best/ is empty (no epoch was evaluated): the latest, and the line says why
    assert line.startswith(f"exported raw weights of step 0 from {tmp_path}/plain/checkpoints/"
                           f"ckpt-0 (latest: {tmp_path}/plain/best has no readable checkpoint)")
    assert "decisions" in line  # thresholds are searched at export time, on these weights


def test_multiclass_exports_softmax_probabilities(tmp_path, embedded_cache):
    from engine.trainer import Trainer
    config = _config(tmp_path / "mc", embedded_cache, ema_decay=0.0).replace(
        model={"task": "multiclass"}, loss={"loss": "cce"})
    trainer = Trainer(config)
    trainer.checkpointer.rolling.save(checkpoint_number=0)
    line = export_saved_model(config)
    images = _images(4, seed=2)
    logits = trainer.parts.model(images, training=False).numpy().astype(np.float64)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    probs = _serve(_exported_dir(line), images)["probabilities"].numpy()
    np.testing.assert_allclose(probs, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def _modules_named(obj, found):
    """Every module a Keras config names (class modules, nested configs included)."""
    if isinstance(obj, dict):
        if "module" in obj and "class_name" in obj:
            found.add(obj["module"])
        for value in obj.values():
            _modules_named(value, found)
    elif isinstance(obj, list):
        for value in obj:
            _modules_named(value, found)
    return found


@pytest.fixture(scope="module")
def exported(run):
    """The default export of the run, made once for the tests that only read it."""
    config, trainer = run
    return _exported_dir(export_saved_model(config))


def test_model_keras_needs_no_tapeworks_and_gives_the_served_probabilities(run, exported):
    """model.keras names only Keras' own classes, and load_model gives serving_default's output."""
    path = os.path.join(exported, "model.keras")
    with zipfile.ZipFile(path) as z:
        modules = _modules_named(json.loads(z.read("config.json")), set())
    assert modules and {m for m in modules if m.split(".")[0] != "keras"} == set()
    model = keras.models.load_model(path)
    assert (model.name, model.layers[-1].name) == ("tapeworks_probabilities", "probabilities")
    images = _images(5, seed=3)
    served = _serve(exported, images)["probabilities"].numpy()
    np.testing.assert_allclose(model.predict(images, verbose=0), served, rtol=0, atol=1e-5)
    logits = model.get_layer("tapeworks")(images, training=False).numpy()
    np.testing.assert_allclose(_sigmoid(logits), served, rtol=0, atol=1e-5)


def test_serving_bytes_decodes_like_validation(run, exported):
    """PNG and JPEG files in -> what serving_default gives on validation's own decoded pixels."""
    config, trainer = run
    target = exported
    from engine.data.tfrecord import file_records, parse_image
    files = sorted(tf.io.gfile.glob(os.path.join(
        config.data.cache_dir, "embedded_v1", "val-*.tfrecord*")))
    records = [parse_image(*r)[0].numpy() for r in file_records(files).take(4)]
    images = next(iter(trainer.parts.data.val_dataset(global_batch=4, input_size=SIZE)))[0]
    jpeg = tf.io.encode_jpeg(tf.io.decode_png(records[3], channels=3)).numpy()
    loaded = tf.saved_model.load(target)
    out = loaded.signatures["serving_bytes"](image_bytes=tf.constant(records + [jpeg]))
    want = loaded.signatures["serving_default"](images=images)
    assert set(out) == {"probabilities", "decisions"}
    np.testing.assert_allclose(out["probabilities"].numpy()[:4], want["probabilities"].numpy(),
                               rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["decisions"].numpy()[:4], want["decisions"].numpy())
    assert out["probabilities"].shape[0] == 5  # the JPEG decodes too (its pixels differ a little)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"serving_bytes image_bytes\[1\]: image is not a PNG or JPEG"):
        loaded.signatures["serving_bytes"](image_bytes=tf.constant([records[0], b"GIF89a"]))
