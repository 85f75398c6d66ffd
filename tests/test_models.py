"""Tests for models/: shapes, names, blocks, preprocessing, weights, errors.

Real backbones are built once each at their minimum size with random
weights (never 'imagenet': no network) and shared through a module fixture;
inceptionv3 and resnet50 are the slow ones at about 1-2 s a build.
"""

import keras
import numpy as np
import pytest

from models import BACKBONES, MIN_INPUT_SIZE, ModelError, backbone_blocks, build_model
from models.backbones import fold_efficientnet_stddev

REAL = [b for b in BACKBONES if b != "tiny_cnn"]


@pytest.fixture(scope="module")
def real_models():
    """Each real backbone's full model, built lazily and at most once."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_model(name, MIN_INPUT_SIZE[name], 13)
        return cache[name]

    return get


def _weights_equal(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb))


# ------------------------------------------------------------------ tiny_cnn
def test_tiny_cnn_outputs_float32_logits():
    model = build_model("tiny_cnn", 32, 5, seed=0)
    assert model.name == "tapeworks"
    assert model.input.dtype == "float32" and tuple(model.input.shape) == (None, 32, 32, 3)
    backbone, head = model.get_layer("backbone"), model.get_layer("head")
    assert isinstance(backbone, keras.Model) and isinstance(head, keras.Model)
    assert any(isinstance(l, keras.layers.BatchNormalization) for l in backbone.layers)
    logits_layer = head.get_layer("logits")
    assert logits_layer.activation is keras.activations.linear
    # No squashing anywhere after the Dense: push the bias far out and the
    # outputs must follow it outside [0, 1].
    logits_layer.bias.assign([-5.0, 5.0, -5.0, 5.0, 0.0])
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = model(x, training=False)
    assert tuple(y.shape) == (8, 5) and y.dtype == "float32"
    y = np.asarray(y)
    assert y.min() < 0.0 and y.max() > 1.0


def test_multiclass_is_the_same_logits_graph_and_dropout_is_in_head():
    model = build_model("tiny_cnn", 16, 3, task="multiclass", dropout=0.5)
    head = model.get_layer("head")
    assert [type(l).__name__ for l in head.layers] == ["InputLayer", "Dropout", "Dense"]
    assert head.get_layer("logits").activation is keras.activations.linear
    x = np.full((2, 16, 16, 3), 128.0, "float32")
    np.testing.assert_array_equal(model(x, training=False), model(x, training=False))


def test_logits_stay_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("tiny_cnn", 16, 2)
        y = model(np.zeros((1, 16, 16, 3), "float32"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert y.dtype == "float32"


def test_same_seed_same_initial_weights():
    a = build_model("tiny_cnn", 16, 4, dropout=0.2, seed=7)
    b = build_model("tiny_cnn", 16, 4, dropout=0.2, seed=7)
    c = build_model("tiny_cnn", 16, 4, dropout=0.2, seed=8)
    assert _weights_equal(a, b)
    assert not _weights_equal(a, c)


def test_tiny_cnn_blocks():
    model = build_model("tiny_cnn", 8, 2)
    blocks = backbone_blocks(model.get_layer("backbone"), "tiny_cnn")
    assert [b[0] for b in blocks] == ["input", "block2_conv", "block3_conv", "block4_conv"]
    assert blocks[-1][-1] == "avg_pool"


# ------------------------------------------------------------ real backbones
@pytest.mark.parametrize("name", REAL)
def test_real_backbone_builds_and_blocks_cover_every_layer(real_models, name):
    model = real_models(name)
    assert tuple(model.output_shape) == (None, 13)
    backbone = model.get_layer("backbone")
    model.get_layer("head")
    blocks = backbone_blocks(backbone, name)
    assert len(blocks) >= 5
    flat = [n for block in blocks for n in block]
    assert len(flat) == len(set(flat)), "a layer is in two blocks"
    assert set(flat) == {l.name for l in backbone.layers}
    weighted = [l.name for l in backbone.layers if l.weights]
    assert all(flat.count(n) == 1 for n in weighted)
    order = [l.name for l in backbone.layers]
    for block in blocks:  # each block lists its layers in model.layers order
        assert block == sorted(block, key=order.index)
    # Auto-named layers are named afresh on every build, so names (and
    # the state keys built from them) do not depend on what was built before.
    assert backbone.layers[0].name == "input_layer"


def test_block_boundaries_follow_the_architecture(real_models):
    inception = backbone_blocks(real_models("inceptionv3").get_layer("backbone"), "inceptionv3")
    assert len(inception) == 12
    assert [b[-1] for b in inception[1:-1]] == [f"mixed{i}" for i in range(10)]
    assert inception[-1][-2:] == ["mixed10", "global_average_pooling2d"]
    assert "conv2d" in inception[0] and not any(n.startswith("mixed") for n in inception[0])
    resnet = backbone_blocks(real_models("resnet50").get_layer("backbone"), "resnet50")
    assert len(resnet) == 17 and resnet[0][-1] == "pool1_pool"
    assert all(b[-1].endswith("_out") for b in resnet[1:-1])
    mobilenet = backbone_blocks(real_models("mobilenetv2").get_layer("backbone"), "mobilenetv2")
    assert len(mobilenet) == 19 and mobilenet[-1][0] == "Conv_1"
    effnet = backbone_blocks(real_models("efficientnetb0").get_layer("backbone"), "efficientnetb0")
    assert len(effnet) == 18 and effnet[0][1:3] == ["rescaling", "normalization"]
    assert effnet[-1][0] == "top_conv"


# ------------------------------------------------------------- preprocessing
def test_inception_style_preprocessing_maps_0_255_to_minus1_1(real_models):
    for name in ("inceptionv3", "mobilenetv2"):
        pre = real_models(name).get_layer("preprocess")
        out = np.asarray(pre(np.array([[[[0.0, 127.5, 255.0]]]], "float32")))
        np.testing.assert_allclose(out, [[[[-1.0, 0.0, 1.0]]]], atol=1e-6)


def test_other_preprocessing(real_models):
    x = np.random.default_rng(1).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    caffe = real_models("resnet50").get_layer("preprocess")
    expected = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(caffe(x), expected, rtol=1e-5, atol=1e-4)
    clone = keras.Model.from_config(caffe.get_config())  # built-in ops only: no custom class
    np.testing.assert_allclose(clone(x), expected, rtol=1e-5, atol=1e-4)
    eff = real_models("efficientnetb0").get_layer("preprocess")
    np.testing.assert_array_equal(eff(x), x)
    tiny = build_model("tiny_cnn", 8, 1).get_layer("preprocess")
    np.testing.assert_allclose(tiny(x), x / 255.0, rtol=1e-6)


def _serialized_modules(obj, found=None):
    """Every (module, class_name) a Keras config names, nested configs included."""
    found = set() if found is None else found
    if isinstance(obj, dict):
        if "module" in obj and "class_name" in obj:
            found.add((obj["module"], obj["class_name"]))
        for value in obj.values():
            _serialized_modules(value, found)
    elif isinstance(obj, list):
        for value in obj:
            _serialized_modules(value, found)
    return found


def test_resnet50_serializes_with_keras_objects_only(real_models):
    """A saved .keras file of any model loads without `import models` (export's model.keras)."""
    config = keras.saving.serialize_keras_object(real_models("resnet50"))
    modules = _serialized_modules(config)
    assert ("keras.src.ops.numpy", "Flip") in modules
    assert {m for m, _ in modules if m != "keras" and not m.startswith("keras.")} == set()


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", BACKBONES)
def test_input_size_below_minimum(name):
    small = MIN_INPUT_SIZE[name] - 1
    msg = f"^--input_size={small} is below {name}'s minimum of {MIN_INPUT_SIZE[name]}$"
    with pytest.raises(ModelError, match=msg):
        build_model(name, small, 3)


def test_unknown_backbone_and_bad_label_count():
    with pytest.raises(ModelError, match=r"^--backbone=foo is not one of inceptionv3, resnet50, "):
        build_model("foo", 224, 3)
    with pytest.raises(ModelError, match=r"^--num_labels=0 "):
        build_model("tiny_cnn", 16, 0)
    with pytest.raises(ModelError, match=r"^--task=regression "):
        build_model("tiny_cnn", 16, 2, task="regression")
    with pytest.raises(ModelError, match=r"^--input_size='32' is not a whole number$"):
        build_model("tiny_cnn", "32", 2)
    assert issubclass(ModelError, ValueError)
    # Sizes that arrive as NumPy integers (from a config) are fine.
    assert build_model("tiny_cnn", np.int64(8), np.int64(2)).output_shape == (None, 2)


# ------------------------------------------------------------------- weights
def test_tiny_cnn_weights_file_round_trip(tmp_path):
    first = build_model("tiny_cnn", 16, 3, seed=1)
    path = tmp_path / "b.weights.h5"
    first.get_layer("backbone").save_weights(str(path))
    second = build_model("tiny_cnn", 32, 3, weights=str(path), seed=2)
    assert _weights_equal(first.get_layer("backbone"), second.get_layer("backbone"))


def test_mobilenetv2_weights_file_via_keras_applications(tmp_path, real_models):
    source = real_models("mobilenetv2").get_layer("backbone")
    path = tmp_path / "mnv2.weights.h5"
    source.save_weights(str(path))
    loaded = build_model("mobilenetv2", 32, 2, weights=str(path))
    assert _weights_equal(source, loaded.get_layer("backbone"))
    with pytest.raises(ModelError, match=r"^--weights=.*mnv2\.weights\.h5 does not fit tiny_cnn"):
        build_model("tiny_cnn", 16, 2, weights=str(path))


def test_bad_weights_paths(tmp_path):
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(ModelError, match=r"^--weights=.*nope\.weights\.h5 does not exist$"):
        build_model("tiny_cnn", 16, 2, weights=str(missing))
    junk = tmp_path / "junk.weights.h5"
    junk.write_text("not hdf5")
    with pytest.raises(ModelError, match=r"^--weights=.*junk\.weights\.h5 does not fit") as err:
        build_model("tiny_cnn", 16, 2, weights=str(junk))
    assert "\n" not in str(err.value)


def test_efficientnet_file_weights_get_keras_imagenet_scaling(tmp_path, real_models):
    # Keras' EfficientNet ImageNet files store std as the Normalization
    # variance; loaded by path the model must still divide by std.
    std = np.array([0.229, 0.224, 0.225], "float32")
    mean = np.array([0.485, 0.456, 0.406], "float32")
    source = real_models("efficientnetb0").get_layer("backbone")
    norm = source.get_layer("normalization")
    saved = [v.numpy() for v in (norm.adapt_mean, norm.adapt_variance)]
    try:
        norm.adapt_mean.assign(mean.reshape(norm.adapt_mean.shape))
        norm.adapt_variance.assign(std.reshape(norm.adapt_variance.shape))
        path = tmp_path / "effnet.weights.h5"
        source.save_weights(str(path))
    finally:
        norm.adapt_mean.assign(saved[0])
        norm.adapt_variance.assign(saved[1])
        norm.finalize_state()
    loaded = build_model("efficientnetb0", 32, 2, weights=str(path)).get_layer("backbone")
    x = np.full((1, 1, 1, 3), 0.5, "float32")  # what Rescaling(1/255) hands on
    got = np.asarray(loaded.get_layer("normalization")(x)).reshape(-1)
    np.testing.assert_allclose(got, (0.5 - mean) / std, rtol=1e-4)
    assert not fold_efficientnet_stddev(loaded), "folding must happen once only"


# -------------------------------------------------------------------- sync BN
def test_sync_bn_sets_every_batchnorm():
    model = build_model("tiny_cnn", 16, 2, sync_bn=True)
    bns = [l for l in model.get_layer("backbone").layers
           if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and all(l.synchronized and l.get_config()["synchronized"] for l in bns)
    assert not build_model("tiny_cnn", 16, 2).get_layer("backbone").get_layer("block1_bn").synchronized


def test_sync_bn_averages_statistics_across_replicas():
    """Two virtual CPUs see different halves of a batch; synchronized BN must
    update moving statistics as if it saw the whole batch on one device.
    The session's CPU is split into two devices (tests/conftest.py)."""
    import tensorflow as tf
    from engine import distribute
    x = np.concatenate([np.zeros((4, 8, 8, 3)), np.full((4, 8, 8, 3), 255.0)]).astype("float32")
    # Fresh collective keys: a strategy made directly here would share its all-reduce keys
    # with the next test's (engine/distribute.py).
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])

    def moving_mean(sync):
        with strategy.scope():
            model = build_model("tiny_cnn", 8, 2, sync_bn=sync, seed=1)
        dist = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices(x).batch(8))
        step = tf.function(lambda b: strategy.run(lambda t: model(t, training=True), args=(b,)))
        for batch in dist:
            step(batch)
        return model.get_layer("backbone").get_layer("block1_bn").moving_mean.numpy()
    reference = build_model("tiny_cnn", 8, 2, seed=1)
    reference(x, training=True)
    ref = reference.get_layer("backbone").get_layer("block1_bn").moving_mean.numpy()
    assert np.allclose(moving_mean(True), ref, atol=1e-5), "sync_bn did not sync"
    assert not np.allclose(moving_mean(False), ref, atol=1e-5), "test cannot tell"
