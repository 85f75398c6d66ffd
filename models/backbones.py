"""Backbone construction: four keras.applications nets and tiny_cnn.

Every backbone is a functional keras.Model named "backbone" that maps
preprocessed images [B, S, S, 3] to pooled features [B, C], so the rest of
the package (head, block grouping, freezing in the engine) treats them alike.
"""

import collections
import contextlib
import numbers
import os
import warnings

import keras
import numpy as np

from models.errors import ModelError

BACKBONES = ("inceptionv3", "resnet50", "mobilenetv2", "efficientnetb0", "tiny_cnn")

# The smallest input_size each backbone's architecture accepts; these are
# the limits keras.applications itself enforces (tiny_cnn: 3 halvings).
MIN_INPUT_SIZE = {
    "inceptionv3": 75,
    "resnet50": 32,
    "mobilenetv2": 32,
    "efficientnetb0": 32,
    "tiny_cnn": 8,
}

_APPLICATIONS = {
    "inceptionv3": keras.applications.InceptionV3,
    "resnet50": keras.applications.ResNet50,
    "mobilenetv2": keras.applications.MobileNetV2,
    "efficientnetb0": keras.applications.EfficientNetB0,
}

TINY_FILTERS = (8, 16, 32, 32)

# What Keras' EfficientNet ImageNet files store as the Normalization
# "variance": the standard deviations, not their squares (TF issue #49930).
_EFFICIENTNET_FILE_VARIANCE = (0.229, 0.224, 0.225)


def validate(backbone, input_size):
    """Raise ModelError (naming the flag) for an unknown backbone or a too
    small input size."""
    if backbone not in BACKBONES:
        raise ModelError(f"--backbone={backbone} is not one of {', '.join(BACKBONES)}")
    minimum = MIN_INPUT_SIZE[backbone]
    if not isinstance(input_size, numbers.Integral) or isinstance(input_size, bool):
        raise ModelError(f"--input_size={input_size!r} is not a whole number")
    input_size = int(input_size)
    if input_size < minimum:
        raise ModelError(
            f"--input_size={input_size} is below {backbone}'s minimum of {minimum}"
        )


@contextlib.contextmanager
def fresh_layer_names():
    """Build with Keras' auto-name counters reset, then restore them.

    keras.applications.InceptionV3 leaves most layers auto-named ("conv2d",
    "conv2d_1", ...) from a process-global counter, so a second build in the
    same process would get "conv2d_94", ... and every name-keyed piece of
    training state would change. Names only need to be unique inside the
    backbone (a nested model), so a private counter during the build makes
    them the same on every build.
    """
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # Keras internals moved: fall back to global names.
        yield
        return
    key = "object_name_uids"
    saved = global_state.get_global_attribute(key)
    global_state.set_global_attribute(key, collections.defaultdict(int))
    try:
        yield
    finally:
        global_state.set_global_attribute(key, saved)


def tiny_cnn(input_size, weights=None):
    """A four-block Conv-BN-ReLU net, milliseconds per step, for tests.

    Each block is named blockN_* so backbone_blocks can group it; BN is there
    on purpose, so the engine can test that frozen BN statistics stay put.
    """
    inputs = keras.Input((input_size, input_size, 3), name="input")
    x = inputs
    for i, filters in enumerate(TINY_FILTERS, start=1):
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, name=f"block{i}_conv"
        )(x)
        x = keras.layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = keras.layers.ReLU(name=f"block{i}_relu")(x)
        if i < len(TINY_FILTERS):
            x = keras.layers.MaxPooling2D(2, padding="same", name=f"block{i}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = keras.Model(inputs, x, name="backbone")
    if weights is not None:
        model.load_weights(weights)
    return model


def build_backbone(backbone, input_size, weights=None):
    """The named backbone as a keras.Model called "backbone" ending in global
    average pooling. `weights` is None, "imagenet" or a local weights file;
    a file is checked here so the user sees the flag, not a Keras trace."""
    if weights not in (None, "imagenet"):
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise ModelError(f"--weights={weights} does not exist")
    try:
        # Keras warns once per unmatched layer before raising on a bad file;
        # hold the warnings back and replay them only if the load worked.
        with warnings.catch_warnings(record=True) as caught, fresh_layer_names():
            warnings.simplefilter("always")
            if backbone == "tiny_cnn":
                model = tiny_cnn(input_size, weights=weights)
            else:
                model = _APPLICATIONS[backbone](
                    include_top=False,
                    weights=weights,
                    input_shape=(input_size, input_size, 3),
                    pooling="avg",
                    name="backbone",
                )
    except Exception as err:  # Keras raises many types; the user needs one line.
        if weights is None:
            raise
        detail = " ".join(str(err).split())[:300]
        if weights == "imagenet":
            raise ModelError(
                f"--weights=imagenet could not be loaded for {backbone} (it needs "
                f"network or a copy in ~/.keras/models): {detail}"
            ) from err
        raise ModelError(
            f"--weights={weights} does not fit {backbone} at input_size "
            f"{input_size}: {detail}"
        ) from err
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if backbone == "efficientnetb0" and weights not in (None, "imagenet"):
        fold_efficientnet_stddev(model)
    return model


def fold_efficientnet_stddev(model):
    """Make an ImageNet EfficientNet file loaded by path mean what it means
    when Keras downloads it.

    With weights="imagenet" Keras inserts Rescaling(1/sqrt(std)) after the
    Normalization layer, because its files store std where a variance
    belongs; with weights=<path> it does not, and inputs come out about 2x
    too large. Folding the factor into the variance (var * std) gives the
    same function without changing the layer list. It only fires when the
    variance still equals the raw file values, so it is idempotent and
    leaves randomly initialised (variance 1) backbones alone.
    Returns True if it changed the layer.
    """
    norm = next(l for l in model.layers if isinstance(l, keras.layers.Normalization))
    variance = norm.adapt_variance  # the weight; norm.variance is a cached copy
    std = np.asarray(_EFFICIENTNET_FILE_VARIANCE, dtype="float32")
    current = np.asarray(keras.ops.convert_to_numpy(variance)).reshape(-1)
    if current.shape != std.shape or not np.allclose(current, std, rtol=1e-4):
        return False
    variance.assign(np.reshape(current * std, variance.shape))
    norm.finalize_state()  # refresh the cached tensors call() actually uses
    return True


def set_synchronized_bn(model):
    """Make every BatchNormalization in `model` (nested too) synchronized.

    Keras 3 reads `self.synchronized` on each training call (BatchNormalization
    ._moments -> ops.moments(..., synchronized=...)), and get_config saves it,
    so flipping the attribute on a built layer is the same as constructing it
    with synchronized=True. Returns how many layers were changed.
    """
    count = 0
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
            count += 1
    return count


def configure_batch_norm(model, *, synchronized: bool, momentum=None) -> None:
    """Every BatchNormalization of `model`: synchronized across replicas, and
    --bn_momentum when given (the classifier and the segmentation builders alike)."""
    if synchronized:
        set_synchronized_bn(model)
    if momentum is None:
        return
    if not 0.0 <= momentum < 1.0:
        raise ModelError(f"--bn_momentum={momentum} must be in [0, 1)")
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = float(momentum)


def _all_layers(model):
    """Every layer inside `model`, however deeply nested (Keras' own walk)."""
    return model._flatten_layers(include_self=False)
