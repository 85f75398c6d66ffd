"""build_model: raw pixels -> preprocess -> backbone -> head -> logits.

The three parts are separate named layers ("preprocess", nested models
"backbone" and "head") so the engine can freeze one by name and key state by
nesting. The model always ends in logits (principle 5: probabilities only at
the edges), in float32 even under a mixed-precision policy, because losses
and metrics are computed from them.
"""

import numbers

import keras

from models.backbones import build_backbone, configure_batch_norm, validate
from models.errors import ModelError
from models.preprocess import make_preprocess
from models.segmentation import build_segmentation_model

TASKS = ("multilabel", "multiclass", "segmentation")


def build_head(num_features, num_outputs, dropout=0.0):
    """Optional Dropout, then Dense(num_outputs) named "logits", no activation."""
    inputs = keras.Input((num_features,), name="features")
    x = inputs
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    logits = keras.layers.Dense(num_outputs, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name="head")


def build_model(
    backbone,
    input_size,
    num_outputs,
    *,
    task="multilabel",
    weights=None,
    dropout=0.0,
    sync_bn=False,
    seed=None,
    bn_momentum=None,
    seg_model="unet",
    unet_depth=4,
    unet_filters=16,
):
    """A functional model "tapeworks": float32 [B, S, S, 3] pixels in [0, 255]
    -> logits [B, num_outputs] (float32, no activation, for either task).

    weights: None (random), "imagenet" (needs network) or a local Keras
    weights file for the backbone. sync_bn: make every BatchNormalization
    synchronized across replicas. seed: seed Keras, Python, NumPy and TF
    first so equal seeds give equal initial weights.
    Raises ModelError, whose one-line message names the flag, for bad input.

    task="segmentation" builds models.segmentation's `seg_model` ("unet" or
    "deeplabv3plus", with unet_depth/unet_filters) instead: per-pixel logits
    [B, S, S, num_outputs]; `backbone` is then not used (the model brings its
    own encoder).
    """
    if task == "segmentation":
        if dropout:
            raise ModelError(f"--dropout={dropout} applies to the classification head; "
                             f"--task=segmentation does not use it")
        return build_segmentation_model(seg_model, input_size, num_outputs, weights=weights,
                                        sync_bn=sync_bn, seed=seed, bn_momentum=bn_momentum,
                                        unet_depth=unet_depth, unet_filters=unet_filters)
    validate(backbone, input_size)
    if not isinstance(num_outputs, numbers.Integral) or num_outputs < 1:
        raise ModelError(f"--num_labels={num_outputs} must be at least 1")
    input_size, num_outputs = int(input_size), int(num_outputs)
    if task not in TASKS:
        raise ModelError(f"--task={task} is not one of {', '.join(TASKS)}")
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"--dropout={dropout} must be in [0, 1)")
    if seed is not None:
        keras.utils.set_random_seed(seed)

    # The task only changes how the engine reads the logits (sigmoid per
    # label vs softmax over classes), never the graph.
    base = build_backbone(backbone, input_size, weights=weights)
    head = build_head(base.output_shape[-1], num_outputs, dropout=dropout)
    inputs = keras.Input((input_size, input_size, 3), dtype="float32", name="image")
    x = make_preprocess(backbone)(inputs)
    logits = head(base(x))
    model = keras.Model(inputs, logits, name="tapeworks")
    configure_batch_norm(model, synchronized=sync_bn, momentum=bn_momentum)
    return model
