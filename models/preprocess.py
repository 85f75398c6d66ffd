"""Input preprocessing as a layer inside the model.

The model takes raw pixels in [0, 255], so the preprocessing each backbone
was trained with has to live in the graph: that way an exported SavedModel
and the training loop can never disagree about it. Everything here is a
built-in layer, or a small functional model of built-in Keras ops (no
Lambda, no custom class), so the model serializes and a saved .keras file
loads with `keras.models.load_model` and no tapeworks import.
"""

import keras
import numpy as np
from keras import ops

# keras.applications.imagenet_utils "caffe" mode: RGB -> BGR, then subtract
# the ImageNet per-channel means given in BGR order; no scaling.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def caffe_preprocess(name="preprocess", mean=CAFFE_BGR_MEAN):
    """resnet50's preprocess_input (caffe style) as a weightless functional model.

    Built from keras.ops on symbolic tensors, which Keras 3 saves as its own
    operations: a registered Layer subclass would make every .keras file of a
    resnet50 need `import models` to load.
    """
    pixels = keras.Input((None, None, 3), dtype="float32", name="pixels")
    bgr = ops.flip(pixels, axis=-1)
    return keras.Model(pixels, bgr - np.asarray(mean, np.float32), name=name)


def make_preprocess(backbone):
    """The layer named "preprocess" that turns [0, 255] pixels into what
    `backbone` expects."""
    name = "preprocess"
    if backbone in ("inceptionv3", "mobilenetv2"):
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name=name)
    if backbone == "resnet50":
        return caffe_preprocess(name)
    if backbone == "efficientnetb0":
        # Keras' EfficientNet rescales (and normalizes) inside itself.
        return keras.layers.Identity(name=name)
    if backbone == "tiny_cnn":
        return keras.layers.Rescaling(1.0 / 255.0, name=name)
    raise KeyError(backbone)
