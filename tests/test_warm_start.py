"""Warm start from users' own files: honest counts, and a loud stop when little fits."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from engine.config import Config, ConfigError, TrainConfig
from engine.state import StateError, TrainingState, model_variable_keys
from engine.warm_start import count_weights_file, warm_start
from models import build_model


class Engine:
    """A tapeworks model with its named state, as the trainer builds them."""

    def __init__(self, num_labels=3, backbone="tiny_cnn", seed=7, **kwargs):
        self.model = build_model(backbone, 32, num_labels, seed=seed, **kwargs)
        self.keys = model_variable_keys(self.model)
        self.state = TrainingState()
        self.state.add_all("model", {self.keys[id(v)]: v for v in self.model.variables})

    def warm_start(self, path, **kwargs):
        return warm_start(str(path), model=self.model, state=self.state, keys=self.keys, **kwargs)

    def values(self):
        return {"model/" + self.keys[id(v)]: np.array(v.numpy()) for v in self.model.weights}


def _fit_briefly(model):
    """What a user does: compile, model.fit two steps on random data."""
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = (rng.uniform(size=(8, model.output_shape[-1])) > 0.5).astype("float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    return model


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """tapeworks' own tiny_cnn trained by model.fit and saved the Keras-user way."""
    model = _fit_briefly(build_model("tiny_cnn", 32, 3, seed=1))
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
        str(tmp_path_factory.mktemp("fit") / "ckpt"))
    return model, path


def _assert_equal_weights(expected, actual_values, keys):
    for key in keys:
        np.testing.assert_array_equal(actual_values[key], expected[key], err_msg=key)


def test_keras_fit_checkpoint_of_the_same_architecture_restores_every_tensor(fitted):
    model, path = fitted
    names = [n for n, _ in tf.train.list_variables(path)]
    # The trap: trainable weights are stored under the optimizer, by position.
    assert "optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE" in names
    assert not any("_kernel" in n for n in names if n.startswith("model/"))

    engine = Engine()
    report = engine.warm_start(path)
    assert (len(report.matched), report.selected) == (22, 22)
    assert report.missing == report.shape_mismatch == report.unused == []
    assert "restored 22 of 22 model tensors" in report.summary()
    source = {"model/" + k: np.array(v.numpy()) for k, v in
              ((model_variable_keys(model)[id(v)], v) for v in model.weights)}
    _assert_equal_weights(source, engine.values(), source)


def test_partially_different_keras_model_matches_what_fits(tmp_path):
    """A flat model (no nested backbone/head), another head, a dropout, another attribute name."""
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    for i, filters in enumerate((8, 16, 32, 32)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
        x = keras.layers.MaxPooling2D(2, padding="same")(x) if i < 3 else x
    x = keras.layers.Dropout(0.5)(keras.layers.GlobalAveragePooling2D()(x))
    user = _fit_briefly(keras.Model(inputs, keras.layers.Dense(5)(x)))
    path = tf.train.Checkpoint(net=user, opt=user.optimizer).write(str(tmp_path / "ckpt"))

    engine = Engine(num_labels=3)
    report = engine.warm_start(path)
    assert len(report.matched) == 20 and report.selected == 22
    assert [m.split(" ")[0] for m in report.shape_mismatch] == [
        "model/head/logits/kernel", "model/head/logits/bias"]
    assert "under 'net'" in report.source
    backbone = [v for v in user.weights if len(v.shape) != 2 and v.shape != (5,)]
    got = engine.values()
    for key, value in zip([k for k in got if k.startswith("model/backbone/")], backbone):
        np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)


def test_keras2_style_object_graph_with_the_model_at_the_root(fitted, tmp_path):
    """tf.keras 2 writes `layer_with_weights-N/kernel` with the model as the checkpoint's root."""
    model, _ = fitted
    keys = model_variable_keys(model)
    layers = {}
    for v in model.weights:
        layer, leaf = keys[id(v)].split("/")[-2:]
        setattr(layers.setdefault(layer, tf.Module()), leaf, tf.Variable(v.numpy()))
    path = tf.train.Checkpoint(**{f"layer_with_weights-{i}": m for i, m in
                                  enumerate(layers.values())}).write(str(tmp_path / "ckpt"))
    engine = Engine()
    report = engine.warm_start(path)
    assert len(report.matched) == 22 and "model at the root" in report.source
    np.testing.assert_array_equal(engine.values()["model/head/logits/kernel"],
                                  model.get_layer("head").get_layer("logits").kernel.numpy())


def test_unrelated_model_is_a_one_line_error_naming_the_file_and_counts(tmp_path):
    other = build_model("mobilenetv2", 32, 3, seed=1)
    path = tf.train.Checkpoint(model=other).write(str(tmp_path / "mobilenet"))
    engine = Engine()
    before = engine.values()
    with pytest.raises(StateError) as err:
        engine.warm_start(path)
    message = str(err.value)
    assert "\n" not in message and f"--init_checkpoint={path}" in message
    # BN vectors of the right length exist in MobileNetV2, its kernels do not.
    assert "13 of 22 model tensors matched (2% of their parameters)" in message
    assert "--init_min_fraction=0.5" in message and "--allow_partial_restore" in message
    _assert_equal_weights(before, engine.values(), before)  # nothing changed
    report = engine.warm_start(path, allow_partial=True)
    assert len(report.matched) == 13 and len(report.unused) > 200


def test_keras_weights_file_counts_what_it_loaded(fitted, tmp_path):
    model, _ = fitted
    full = str(tmp_path / "same.weights.h5")
    model.save_weights(full)
    engine = Engine()
    report = engine.warm_start(full)
    assert (len(report.matched), report.selected, report.unused) == (22, 22, [])
    np.testing.assert_array_equal(engine.model.get_layer("head").get_layer("logits").kernel.numpy(),
                                  model.get_layer("head").get_layer("logits").kernel.numpy())

    report = Engine(num_labels=4).warm_start(full)  # a new head: the file's head is left over
    assert len(report.matched) == 20 and len(report.missing) == 2 and len(report.unused) == 2

    backbone_only = str(tmp_path / "backbone.weights.h5")
    model.get_layer("backbone").save_weights(backbone_only)
    report = Engine().warm_start(backbone_only)
    assert len(report.matched) == 20 and "into the nested 'backbone'" in report.source

    inputs = keras.Input((6,))
    unrelated = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    unrelated.save_weights(str(tmp_path / "zero.weights.h5"))
    engine = Engine()
    before = engine.values()
    with pytest.raises(StateError, match=r"zero\.weights\.h5 does not fit.*0 of 22 model tensors "
                                         r"matched.*22 missing.*2 unused.*nothing to warm start"):
        engine.warm_start(tmp_path / "zero.weights.h5")
    _assert_equal_weights(before, engine.values(), before)  # the NaN probe left no trace


def test_name_based_checkpoint_matches_unique_layer_and_leaf_names(fitted, tmp_path):
    model, _ = fitted
    keys = model_variable_keys(model)
    # Keras 2 / TF1 style: "<layer>/<leaf>" names, written by a name-based Saver.
    named = {"/".join(keys[id(v)].split("/")[-2:]): tf.Variable(v.numpy()) for v in model.weights}
    named["other/logits/bias"] = tf.Variable(np.zeros(3, np.float32))  # makes logits/bias ambiguous
    path = tf.compat.v1.train.Saver(var_list=named).save(None, str(tmp_path / "tf1" / "model"))
    report = Engine().warm_start(path)
    assert "name-based" in report.source
    assert len(report.matched) == 21 and report.missing == ["model/head/logits/bias"]
    assert sorted(report.unused) == ["logits/bias", "other/logits/bias"]

    # A dict tf.train.Checkpoint with ":0" names (escaped "/" in the keys).
    as_dict = {f"{k}:0": v for k, v in named.items() if not k.startswith("other")}
    path = tf.train.Checkpoint(**as_dict).write(str(tmp_path / "dict" / "ckpt"))
    engine = Engine()
    report = engine.warm_start(path)
    assert len(report.matched) == 22
    np.testing.assert_array_equal(engine.values()["model/backbone/block3_bn/moving_mean"],
                                  named["block3_bn/moving_mean"].numpy())


def test_include_typo_is_an_error_and_exclude_is_counted(fitted):
    _, path = fitted
    with pytest.raises(StateError, match=r"--init_include=backbone/\* selects no model tensor"):
        Engine().warm_start(path, include=["backbone/*"])
    engine = Engine()
    head_before = engine.values()["model/head/logits/kernel"]
    report = engine.warm_start(path, exclude=["model/head/*"])
    assert (len(report.matched), report.selected) == (20, 20)
    assert report.excluded == ["model/head/logits/kernel", "model/head/logits/bias"]
    assert "2 excluded" in report.summary()
    np.testing.assert_array_equal(engine.values()["model/head/logits/kernel"], head_before)


def test_tapeworks_checkpoint_by_key_and_min_fraction(tmp_path):
    source = Engine(seed=3)
    path = source.state.checkpoint().write(str(tmp_path / "ckpt"))
    report = Engine().warm_start(path)
    assert report.source == "tapeworks checkpoint" and len(report.matched) == 22
    # A 5-label head leaves 20 of 22: enough at 0.9, too little at 0.95.
    assert len(Engine(num_labels=5).warm_start(path, min_fraction=0.9).matched) == 20
    with pytest.raises(StateError, match="below --init_min_fraction=0.95"):
        Engine(num_labels=5).warm_start(path, min_fraction=0.95)
    with pytest.raises(ConfigError, match="--init_min_fraction=1.5 must be in"):
        Config(train=TrainConfig(init_min_fraction=1.5)).validated()


def test_weights_file_of_the_backbone_is_counted(fitted, tmp_path):
    model, _ = fitted
    path = str(tmp_path / "backbone.weights.h5")
    model.get_layer("backbone").save_weights(path)
    backbone = build_model("tiny_cnn", 32, 3, weights=path).get_layer("backbone")
    before = [np.array(v.numpy()) for v in backbone.weights]
    report = count_weights_file(path, backbone)
    assert "restored 20 of 20 backbone tensors" in report.summary()
    for a, v in zip(before, backbone.weights):
        np.testing.assert_array_equal(a, v.numpy())
    other = build_model("tiny_cnn", 32, 3).get_layer("head")
    with pytest.raises(StateError, match="does not fit the head.*0 of 2 head tensors"):
        count_weights_file(path, other)


def test_train_main_stops_on_a_bad_warm_start_and_prints_a_good_one(fitted, tmp_path,
                                                                     embedded_cache,
                                                                     train_main_here):
    model, good = fitted
    inputs = keras.Input((6,))
    bad = tf.train.Checkpoint(model=keras.Model(inputs, keras.layers.Dense(2)(inputs))).write(
        str(tmp_path / "bad" / "ckpt"))
    backbone = str(tmp_path / "backbone.weights.h5")
    model.get_layer("backbone").save_weights(backbone)
    common = [f"--cache_dir={embedded_cache}", "--backbone=tiny_cnn", "--batch_size=8",
              "--steps_per_epoch=1", "--epochs=1", "--progress=false"]

    code, _, err = train_main_here(f"--model_dir={tmp_path}/a", f"--init_checkpoint={bad}",
                                   *common)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith(f"error: --init_checkpoint={bad} does not fit this model")
    assert "0 of 22 model tensors matched" in lines[-1]

    code, out, err = train_main_here(f"--model_dir={tmp_path}/b", f"--init_checkpoint={good}",
                                     f"--weights={backbone}", *common)
    assert code == 0, err
    assert "--weights: restored 20 of 20 backbone tensors" in out
    assert "warm start: restored " in out and " of 22 model tensors" in out
