"""Segmentation models: U-Net and DeepLabV3+ -> per-pixel logits [B, H, W, C].

Same shape of model as the classifiers (builder.py), so the engine freezes,
keys and trains them the same way:

    "image" [B,S,S,3] 0..255 -> "preprocess" -> "backbone" (encoder, a nested
    keras.Model with several outputs) -> "head" (decoder, a nested keras.Model
    taking them all) -> logits [B,S,S,C], float32, no activation.

U-Net: `depth` poolings; encoder block k (block1..block{depth+1}) is
Conv-BN-ReLU twice with filters * 2^(k-1) channels; the decoder mirrors it
with a 2x2 transposed convolution, the skip concatenation and Conv-BN-ReLU
twice per level (up{k}_*), then a 1x1 "logits" convolution. The encoder's
layers are named blockN_* so models.backbone_blocks groups them ("unet").

DeepLabV3+: keras.applications MobileNetV2 (weights None, "imagenet" or a
local file) cut at block_3_expand_relu (stride 4, low-level features) and
block_13_expand_relu (stride 16); the head is ASPP (1x1, three atrous 3x3 at
rates 6/12/18, image pooling) on the stride-16 features, upsampled x4 and
joined with the projected low-level features, two 3x3 convolutions, 1x1
"logits" and a bilinear x4 upsampling back to the input size. Its blocks are
MobileNetV2's ("deeplabv3plus" in models.backbone_blocks).
"""

import numbers
import os
import warnings

import keras

from models.backbones import configure_batch_norm, fresh_layer_names
from models.errors import ModelError
from models.preprocess import make_preprocess

SEG_MODELS = ("unet", "deeplabv3plus")
UNET_MAX_DEPTH = 6
DEEPLAB_STRIDE = 16
DEEPLAB_MIN_INPUT = 32
DEEPLAB_LOW_LEVEL = "block_3_expand_relu"      # stride 4, 144 channels
DEEPLAB_HIGH_LEVEL = "block_13_expand_relu"    # stride 16, 576 channels
ASPP_RATES = (6, 12, 18)


def _conv_bn_relu(x, filters, kernel, name, dilation=1):
    x = keras.layers.Conv2D(filters, kernel, padding="same", dilation_rate=dilation,
                            use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _logits(x, num_classes):
    return keras.layers.Conv2D(num_classes, 1, dtype="float32", name="logits")(x)


# ------------------------------------------------------------------- U-Net
def unet_encoder(input_size, depth, filters):
    """keras.Model "backbone": [S,S,3] -> [skip_1..skip_depth, bottleneck]."""
    inputs = keras.Input((input_size, input_size, 3), name="input")
    x, outputs = inputs, []
    for k in range(1, depth + 2):
        width = filters * 2 ** (k - 1)
        x = _conv_bn_relu(x, width, 3, f"block{k}_1")
        x = _conv_bn_relu(x, width, 3, f"block{k}_2")
        outputs.append(x)
        if k <= depth:
            x = keras.layers.MaxPooling2D(2, name=f"block{k}_pool")(x)
    return keras.Model(inputs, outputs, name="backbone")


def unet_decoder(input_size, depth, filters, num_classes):
    """keras.Model "head": the encoder's outputs -> logits [S,S,C]."""
    inputs = [keras.Input((input_size >> (k - 1), input_size >> (k - 1), filters * 2 ** (k - 1)),
                          name=f"skip{k}" if k <= depth else "bottleneck")
              for k in range(1, depth + 2)]
    x = inputs[-1]
    for k in range(depth, 0, -1):
        width = filters * 2 ** (k - 1)
        x = keras.layers.Conv2DTranspose(width, 2, strides=2, name=f"up{k}_upconv")(x)
        x = keras.layers.Concatenate(name=f"up{k}_concat")([x, inputs[k - 1]])
        x = _conv_bn_relu(x, width, 3, f"up{k}_1")
        x = _conv_bn_relu(x, width, 3, f"up{k}_2")
    return keras.Model(inputs, _logits(x, num_classes), name="head")


def _check_unet(input_size, depth, filters, weights):
    for flag, value in (("unet_depth", depth), ("unet_filters", filters)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ModelError(f"--{flag}={value!r} is not a whole number")
    if not 1 <= depth <= UNET_MAX_DEPTH:
        raise ModelError(f"--unet_depth={depth} must be in [1, {UNET_MAX_DEPTH}]")
    if filters < 1:
        raise ModelError(f"--unet_filters={filters} must be >= 1")
    if input_size % 2 ** depth:
        raise ModelError(f"--input_size={input_size} must be a multiple of 2^unet_depth = "
                         f"{2 ** depth} for the U-Net (--unet_depth={depth})")
    if weights == "imagenet":
        raise ModelError("--weights=imagenet: the U-Net encoder has no ImageNet weights; "
                         "leave --weights empty or give a weights file of its encoder")


def _load_encoder_weights(encoder, weights):
    if not os.path.isfile(weights):
        raise ModelError(f"--weights={weights} does not exist")
    try:
        encoder.load_weights(weights)
    except Exception as err:  # Keras raises many types; the user needs one line.
        detail = " ".join(str(err).split())[:300]
        raise ModelError(f"--weights={weights} does not fit the U-Net encoder: {detail}") from err


# -------------------------------------------------------------- DeepLabV3+
def deeplab_encoder(input_size, weights=None):
    """keras.Model "backbone": MobileNetV2 -> [stride-4 features, stride-16 features]."""
    if weights not in (None, "imagenet"):
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise ModelError(f"--weights={weights} does not exist")
    try:
        with warnings.catch_warnings():
            # MobileNetV2 warns that non-224 inputs have no ImageNet weights of their own.
            warnings.simplefilter("ignore")
            base = keras.applications.MobileNetV2(
                include_top=False, weights=weights, input_shape=(input_size, input_size, 3),
                name="mobilenetv2")
    except Exception as err:  # Keras raises many types; the user needs one line.
        if weights is None:
            raise
        detail = " ".join(str(err).split())[:300]
        where = ("--weights=imagenet could not be loaded (it needs network or a copy in "
                 "~/.keras/models)" if weights == "imagenet"
                 else f"--weights={weights} does not fit MobileNetV2 at input_size {input_size}")
        raise ModelError(f"{where}: {detail}") from err
    outputs = [base.get_layer(DEEPLAB_LOW_LEVEL).output, base.get_layer(DEEPLAB_HIGH_LEVEL).output]
    return keras.Model(base.input, outputs, name="backbone")


def deeplab_decoder(input_size, num_classes, low_channels, high_channels, filters=256,
                    low_filters=48):
    """keras.Model "head": ASPP + the DeepLabV3+ decoder -> logits [S,S,C]."""
    s4, s16 = input_size // 4, input_size // DEEPLAB_STRIDE
    low = keras.Input((s4, s4, low_channels), name="low_level")
    high = keras.Input((s16, s16, high_channels), name="high_level")
    branches = [_conv_bn_relu(high, filters, 1, "aspp0")]
    for i, rate in enumerate(ASPP_RATES, start=1):
        branches.append(_conv_bn_relu(high, filters, 3, f"aspp{i}", dilation=rate))
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(high)
    pooled = _conv_bn_relu(pooled, filters, 1, "aspp_pool_proj")
    branches.append(keras.layers.UpSampling2D((s16, s16), name="aspp_pool_up")(pooled))
    x = keras.layers.Concatenate(name="aspp_concat")(branches)
    x = _conv_bn_relu(x, filters, 1, "aspp_project")
    x = keras.layers.UpSampling2D(4, interpolation="bilinear", name="decoder_up")(x)
    skip = _conv_bn_relu(low, low_filters, 1, "low_project")
    x = keras.layers.Concatenate(name="decoder_concat")([x, skip])
    x = _conv_bn_relu(x, filters, 3, "decoder1")
    x = _conv_bn_relu(x, filters, 3, "decoder2")
    x = _logits(x, num_classes)
    x = keras.layers.UpSampling2D(4, interpolation="bilinear", dtype="float32",
                                  name="upsample_logits")(x)
    return keras.Model([low, high], x, name="head")


def _check_deeplab(input_size):
    if input_size < DEEPLAB_MIN_INPUT or input_size % DEEPLAB_STRIDE:
        raise ModelError(f"--input_size={input_size} must be a multiple of {DEEPLAB_STRIDE} and "
                         f">= {DEEPLAB_MIN_INPUT} for --seg_model=deeplabv3plus")


# ------------------------------------------------------------------ builder
def build_segmentation_model(seg_model, input_size, num_classes, *, weights=None,
                             sync_bn=False, seed=None, bn_momentum=None, unet_depth=4,
                             unet_filters=16, deeplab_filters=256):
    """A functional model "tapeworks": float32 [B,S,S,3] pixels in [0, 255] ->
    per-pixel logits [B,S,S,num_classes] (float32, no activation).

    seg_model: "unet" or "deeplabv3plus". weights: None (random), or for the
    encoder a local weights file ("imagenet" too for deeplabv3plus).
    Raises ModelError, whose one-line message names the flag, for bad input.
    """
    if seg_model not in SEG_MODELS:
        raise ModelError(f"--seg_model={seg_model} is not one of {', '.join(SEG_MODELS)}")
    if not isinstance(input_size, numbers.Integral) or isinstance(input_size, bool):
        raise ModelError(f"--input_size={input_size!r} is not a whole number")
    if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ModelError(f"segmentation needs at least 2 classes (background included), "
                         f"got {num_classes}")
    input_size, num_classes = int(input_size), int(num_classes)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    with fresh_layer_names():
        if seg_model == "unet":
            _check_unet(input_size, unet_depth, unet_filters, weights)
            encoder = unet_encoder(input_size, int(unet_depth), int(unet_filters))
            if weights is not None:
                _load_encoder_weights(encoder, os.fspath(weights))
            decoder = unet_decoder(input_size, int(unet_depth), int(unet_filters), num_classes)
            preprocess = make_preprocess("tiny_cnn")           # x / 255
        else:
            _check_deeplab(input_size)
            encoder = deeplab_encoder(input_size, weights=weights)
            low, high = (int(t.shape[-1]) for t in encoder.outputs)
            decoder = deeplab_decoder(input_size, num_classes, low, high,
                                      filters=int(deeplab_filters))
            preprocess = make_preprocess("mobilenetv2")        # x / 127.5 - 1
        inputs = keras.Input((input_size, input_size, 3), dtype="float32", name="image")
        logits = decoder(encoder(preprocess(inputs)))
        model = keras.Model(inputs, logits, name="tapeworks")
    configure_batch_norm(model, synchronized=sync_bn, momentum=bn_momentum)
    return model
