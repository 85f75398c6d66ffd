"""Losses: pure functions of (labels, logits) -> per-example loss, shape [B].

Why per-example: the training step averages the per-example loss over the
GLOBAL batch with ``tf.nn.compute_average_loss``, so one code path gives the
same gradient on one replica and on many. Every loss here therefore reduces
over everything except the batch axis (labels, pixels, classes) itself.

Why logits: every formula is written with softplus / log_sigmoid /
log_softmax, never ``log(sigmoid(x))``. ``sigmoid(30.)`` is exactly 1.0 in
float32, so ``log(1 - sigmoid(x))`` is ``log(0) = -inf`` and its gradient is
NaN -- that is how the users' focal loss went NaN. All losses here return
finite values and finite gradients for logits of +-100 and +-1e4 (tested).
A model whose head already applies sigmoid/softmax feeds probabilities into
these functions; see ``engine.collapse.check_output_activation``.

Computation is in float32 whatever the logits' dtype (mixed precision).

Entry points:
    make_loss(spec, num_labels=..., ...)   the engine's factory, spec like "bce+fbeta"
    parse_pos_weight(text, num_labels, prevalence)   --pos_weight=auto | w1,w2,...
    pos_weight_from_prevalence(prevalence, max_weight=...)
and one public function per loss, usable on its own.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

__all__ = [
    "LossError", "make_loss", "parse_pos_weight", "pos_weight_from_prevalence",
    "LOSS_NAMES", "TASKS",
    "binary_cross_entropy", "weighted_binary_cross_entropy", "sigmoid_focal",
    "softmax_focal", "soft_fbeta", "categorical_cross_entropy",
    "sparse_categorical_cross_entropy", "segmentation_cross_entropy", "soft_dice",
    "lovasz_softmax", "lovasz_hinge",
]

TASKS = ("multilabel", "multiclass", "segmentation")

# Which loss names make sense for which task. A mismatch (say "cce" on
# multi-label data) would train without error but optimise the wrong thing,
# so make_loss refuses it.
_NAME_TASKS: Dict[str, Tuple[str, ...]] = {
    "bce": ("multilabel",),
    "weighted_bce": ("multilabel",),
    "focal": ("multilabel", "multiclass"),
    "fbeta": ("multilabel",),
    "cce": ("multiclass",),
    "sparse_cce": ("multiclass",),
    "ce": ("segmentation",),
    "dice": ("segmentation",),
    "lovasz": ("segmentation",),
}
LOSS_NAMES = tuple(_NAME_TASKS)

# Terms that can use label smoothing; the others need hard labels.
_SMOOTHABLE = ("bce", "weighted_bce", "cce", "sparse_cce", "ce")

FBETA_EPSILON = 1e-7   # keeps 1 - F finite when an example has no positives
DICE_SMOOTH = 1.0      # in pixel units; see soft_dice


class LossError(ValueError):
    """A user's loss setting is wrong. The one-line message names the flag."""


# --------------------------------------------------------------------------
# helpers

def _f32(x) -> tf.Tensor:
    return tf.cast(x, tf.float32)


def _mean_over_non_batch(x: tf.Tensor) -> tf.Tensor:
    """[B, ...] -> [B]: the mean over every axis but the first."""
    return tf.reduce_mean(tf.reshape(x, [tf.shape(x)[0], -1]), axis=1)


def _smooth_binary(labels: tf.Tensor, label_smoothing: float) -> tf.Tensor:
    """Keras' convention for binary targets: y -> y (1 - s) + s / 2."""
    if label_smoothing:
        return labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return labels


def _smooth_categorical(onehot: tf.Tensor, label_smoothing: float) -> tf.Tensor:
    """Keras' convention: y -> y (1 - s) + s / C."""
    if label_smoothing:
        num_classes = tf.cast(tf.shape(onehot)[-1], tf.float32)
        return onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
    return onehot


def _class_ids(labels: tf.Tensor, logits: tf.Tensor, what: str) -> Optional[tf.Tensor]:
    """Integer class ids shaped like logits[..., 0], or None for one-hot labels.

    Ids come as [..] (rank one below the logits) or [.., 1]; one-hot (or
    soft) labels have the logits' shape.
    """
    labels, logits = tf.convert_to_tensor(labels), tf.convert_to_tensor(logits)
    lr, gr = labels.shape.rank, logits.shape.rank
    if lr is None or gr is None:
        raise LossError(f"--loss={what}: labels and logits need a known rank")
    if lr == gr - 1:
        return tf.cast(labels, tf.int32)
    if lr == gr and labels.shape[-1] == 1 and logits.shape[-1] != 1:
        return tf.cast(tf.squeeze(labels, axis=-1), tf.int32)
    if lr == gr:
        return None
    raise LossError(f"--loss={what}: labels of shape {labels.shape} do not fit "
                    f"logits of shape {logits.shape} (want class ids [..] or one-hot [.., C])")


def _one_hot_labels(labels: tf.Tensor, logits: tf.Tensor, what: str) -> tf.Tensor:
    """Labels as float one-hot with the logits' shape, from ids or one-hot.

    Out-of-range ids become all-zero rows (tf.one_hot), i.e. pixels that no
    class claims; there is no separate "ignore" label.
    """
    ids = _class_ids(labels, logits, what)
    if ids is not None:
        return tf.one_hot(ids, depth=tf.shape(logits)[-1], dtype=tf.float32)
    return _f32(labels)


# --------------------------------------------------------------------------
# multi-label losses: labels [B, L] in {0,1} (or soft), logits [B, L]

def binary_cross_entropy(labels, logits, label_smoothing: float = 0.0) -> tf.Tensor:
    """Sigmoid cross entropy, averaged over labels -> [B].

    Uses TF's fused op, which is written as max(x,0) - x y + log1p(exp(-|x|)).
    """
    labels = _smooth_binary(_f32(labels), label_smoothing)
    per_label = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=_f32(logits))
    return tf.reduce_mean(per_label, axis=-1)


def weighted_binary_cross_entropy(labels, logits, pos_weight,
                                  label_smoothing: float = 0.0) -> tf.Tensor:
    """BCE whose positive term for label j is multiplied by pos_weight[j] -> [B].

        loss_j = w_j y_j softplus(-x_j) + (1 - y_j) softplus(x_j)

    since -log sigmoid(x) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x).
    This is the fix for "the model predicts the two common labels as 1 and
    the rest as 0": with w_j > 1 a missed rare positive costs w_j times more.
    """
    labels = _smooth_binary(_f32(labels), label_smoothing)
    logits = _f32(logits)
    weight = tf.constant(np.asarray(pos_weight, np.float32))
    per_label = (weight * labels * tf.nn.softplus(-logits)
                 + (1.0 - labels) * tf.nn.softplus(logits))
    return tf.reduce_mean(per_label, axis=-1)


def sigmoid_focal(labels, logits, gamma: float = 2.0,
                  alpha: Optional[float] = 0.25) -> tf.Tensor:
    """Multi-label focal loss (Lin et al. 2017), averaged over labels -> [B].

        FL = alpha_t (1 - p_t)^gamma * BCE,   alpha_t = alpha y + (1 - alpha)(1 - y)

    The modulating factor is computed in log space:
        log(1 - p_t) = -(y softplus(x) + (1 - y) softplus(-x))
    (exact for hard labels; for soft labels it is (1-p)^(gamma y) p^(gamma (1-y))).
    Computing (1 - sigmoid(x))**gamma instead is what produced NaN: at large
    logits 1 - p rounds to 0 and its log or its pow-gradient blows up.
    With gamma=0 and alpha=None this is exactly binary_cross_entropy.
    """
    labels, logits = _f32(labels), _f32(logits)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    if gamma:
        log_one_minus_pt = -(labels * tf.nn.softplus(logits)
                             + (1.0 - labels) * tf.nn.softplus(-logits))
        ce = tf.exp(gamma * log_one_minus_pt) * ce
    if alpha is not None:
        ce = (alpha * labels + (1.0 - alpha) * (1.0 - labels)) * ce
    return tf.reduce_mean(ce, axis=-1)


def soft_fbeta(labels, logits, beta: float = 2.0) -> tf.Tensor:
    """1 - soft F-beta of each example over its labels -> [B].

    With p = sigmoid(logits): tp = sum p y, fp = sum p (1 - y), fn = sum (1 - p) y,
        F = (1 + b^2) tp / ((1 + b^2) tp + b^2 fn + fp + eps).
    The denominator equals b^2 sum(y) + sum(p), which is how it is computed
    (no cancellation). Per example, so it matches the Planet per-sample F2
    and averages over the global batch like every other loss. An example
    without any positive label has F = 0 whatever the prediction (loss 1,
    zero gradient): it teaches nothing about negatives, which is why this is
    usually blended with BCE ("bce+fbeta").
    """
    labels, probs = _f32(labels), tf.sigmoid(_f32(logits))
    b2 = float(beta) ** 2
    tp = tf.reduce_sum(probs * labels, axis=-1)
    denom = b2 * tf.reduce_sum(labels, axis=-1) + tf.reduce_sum(probs, axis=-1)
    return 1.0 - (1.0 + b2) * tp / (denom + FBETA_EPSILON)


# --------------------------------------------------------------------------
# multi-class losses: logits [B, C]

def categorical_cross_entropy(labels, logits, label_smoothing: float = 0.0) -> tf.Tensor:
    """Softmax cross entropy with one-hot (or soft) labels [B, C] -> [B]."""
    labels = _smooth_categorical(_f32(labels), label_smoothing)
    return tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=_f32(logits))


def sparse_categorical_cross_entropy(labels, logits, label_smoothing: float = 0.0) -> tf.Tensor:
    """Softmax cross entropy with integer labels [B] (or [B, 1]) -> [B].

    Label smoothing without building one-hot vectors:
        -sum_c y_c log p_c  with y = (1-s) onehot + s/C  =  (1-s) CE + s mean_c(-log p_c).
    The sparse op is kept because it rejects out-of-range ids on CPU instead
    of silently scoring them 0 as tf.one_hot would.
    """
    logits = _f32(logits)
    ids = _class_ids(labels, logits, "sparse_cce")
    if ids is None:
        raise LossError(f"--loss=sparse_cce wants integer class ids [B], got labels of shape "
                        f"{labels.shape}; use --loss=cce for one-hot labels")
    return _sparse_ce(ids, logits, label_smoothing)


def _sparse_ce(ids: tf.Tensor, logits: tf.Tensor, label_smoothing: float) -> tf.Tensor:
    """Per-position sparse softmax CE with optional smoothing; shape of ids."""
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=ids, logits=logits)
    if label_smoothing:
        uniform = -tf.reduce_mean(tf.nn.log_softmax(logits, axis=-1), axis=-1)
        ce = (1.0 - label_smoothing) * ce + label_smoothing * uniform
    return ce


def softmax_focal(labels, logits, gamma: float = 2.0,
                  alpha: Optional[float] = 0.25) -> tf.Tensor:
    """Multi-class focal loss -> [B]; labels one-hot [B, C] or ids [B].

        FL = -sum_c y_c alpha (1 - p_c)^gamma log p_c      (Keras' convention:
    a scalar alpha scales every class alike; None means 1).
    log p comes from log_softmax; 1 - p_c = -expm1(log p_c), floored at 1e-30
    before the power so the pow-gradient stays finite when p_c rounds to 1
    (the floor only acts where the modulating factor is already ~0).
    With gamma=0 and alpha=None this is exactly categorical cross entropy.
    """
    logits = _f32(logits)
    onehot = _one_hot_labels(labels, logits, "focal")
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    per_class = -onehot * log_probs
    if gamma:
        one_minus_p = tf.maximum(-tf.math.expm1(log_probs), 1e-30)
        per_class = tf.exp(gamma * tf.math.log(one_minus_p)) * per_class
    if alpha is not None:
        per_class = alpha * per_class
    return tf.reduce_sum(per_class, axis=-1)


# --------------------------------------------------------------------------
# segmentation losses: logits [B, H, W, C]; labels ids [B, H, W] (or
# [B, H, W, 1]) or one-hot [B, H, W, C]. One channel means binary (sigmoid) segmentation, and then
# labels are a 0/1 mask [B, H, W] or [B, H, W, 1].

def _binary_mask(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """0/1 mask with the logits' shape [B, H, W, 1]."""
    labels = _f32(labels)
    if labels.shape.rank == logits.shape.rank - 1:
        labels = labels[..., tf.newaxis]
    return labels


def segmentation_cross_entropy(labels, logits, label_smoothing: float = 0.0) -> tf.Tensor:
    """Pixel cross entropy, averaged over the pixels of each image -> [B].

    Softmax CE for C > 1 channels, sigmoid CE for 1 channel.
    """
    logits = _f32(logits)
    ids = None if logits.shape[-1] == 1 else _class_ids(labels, logits, "ce")
    if logits.shape[-1] == 1:
        mask = _smooth_binary(_binary_mask(labels, logits), label_smoothing)
        pixel = tf.nn.sigmoid_cross_entropy_with_logits(labels=mask, logits=logits)
    elif ids is not None:
        pixel = _sparse_ce(ids, logits, label_smoothing)
    else:
        onehot = _smooth_categorical(_f32(labels), label_smoothing)
        pixel = tf.nn.softmax_cross_entropy_with_logits(labels=onehot, logits=logits)
    return _mean_over_non_batch(pixel)


def _seg_probs_and_targets(labels, logits, what: str) -> Tuple[tf.Tensor, tf.Tensor]:
    """Probabilities and float targets, both [B, N, C] with N = H*W."""
    logits = _f32(logits)
    if logits.shape[-1] == 1:
        probs, target = tf.sigmoid(logits), _binary_mask(labels, logits)
    else:
        probs = tf.nn.softmax(logits, axis=-1)
        target = _one_hot_labels(labels, logits, what)
    batch, channels = tf.shape(logits)[0], tf.shape(logits)[-1]
    return (tf.reshape(probs, [batch, -1, channels]),
            tf.reshape(target, [batch, -1, channels]))


def soft_dice(labels, logits, smooth: float = DICE_SMOOTH) -> tf.Tensor:
    """1 - soft Dice per image, averaged over classes -> [B].

        dice_c = (2 sum p y + smooth) / (sum p + sum y + smooth)
    Softmax over channels for C > 1, sigmoid for 1 channel (foreground only).
    The smoothing term sits in numerator and denominator so a class absent
    from an image and not predicted scores 1 rather than 0/0; it is in pixel
    units (1 pixel), small beside any real mask.
    """
    probs, target = _seg_probs_and_targets(labels, logits, "dice")
    inter = tf.reduce_sum(probs * target, axis=1)
    denom = tf.reduce_sum(probs, axis=1) + tf.reduce_sum(target, axis=1)
    dice = (2.0 * inter + smooth) / (denom + smooth)
    return 1.0 - tf.reduce_mean(dice, axis=-1)


def _lovasz_grad(gt_sorted: tf.Tensor) -> tf.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. errors
    sorted in decreasing order (Berman et al. 2018, Alg. 1), on the last axis.

    With the first i sorted pixels counted as mistakes, the Jaccard loss is
    1 - |gt minus mistakes| / |gt union mistakes|; the gradient is its
    increments. The union is never 0: it holds every positive, and when there
    are none the first pixel is itself a negative mistake.
    """
    gts = tf.reduce_sum(gt_sorted, axis=-1, keepdims=True)
    intersection = gts - tf.cumsum(gt_sorted, axis=-1)
    union = gts + tf.cumsum(1.0 - gt_sorted, axis=-1)
    jaccard = 1.0 - intersection / union
    return tf.concat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], axis=-1)


def _lovasz_sorted_dot(errors: tf.Tensor, gt: tf.Tensor, transform=None) -> tf.Tensor:
    """sum_i transform(e_sorted_i) * grad_i over the last axis, sorted by e."""
    errors_sorted, order = tf.math.top_k(errors, k=tf.shape(errors)[-1], sorted=True)
    gt_sorted = tf.gather(gt, order, batch_dims=len(errors.shape) - 1)
    grad = tf.stop_gradient(_lovasz_grad(gt_sorted))
    if transform is not None:
        errors_sorted = transform(errors_sorted)
    return tf.reduce_sum(errors_sorted * grad, axis=-1)


def lovasz_hinge(labels, logits) -> tf.Tensor:
    """Binary Lovasz hinge per image -> [B] (1-channel logits [B, H, W, 1]).

    Errors are hinge margins relu(1 - x s) with s = +-1; the loss is the
    Lovasz extension of the foreground Jaccard loss evaluated at them (the
    reference implementation's relu variant, per image).
    """
    logits = _f32(logits)
    mask = _binary_mask(labels, logits)
    batch = tf.shape(logits)[0]
    x = tf.reshape(logits, [batch, -1])
    gt = tf.reshape(mask, [batch, -1])
    errors = 1.0 - x * (2.0 * gt - 1.0)
    return _lovasz_sorted_dot(errors, gt, transform=tf.nn.relu)


def lovasz_softmax(labels, logits) -> tf.Tensor:
    """Lovasz-softmax per image -> [B] (logits [B, H, W, C], C > 1).

    For each class c the errors are |y_c - p_c| per pixel and the class loss
    is the Lovasz extension of the Jaccard loss of class c. The image's loss
    averages the classes present in its labels (the reference's
    classes="present"); an image with no labelled class scores 0.
    """
    probs, target = _seg_probs_and_targets(labels, logits, "lovasz")
    probs = tf.transpose(probs, [0, 2, 1])     # [B, C, N]
    target = tf.transpose(target, [0, 2, 1])
    per_class = _lovasz_sorted_dot(tf.abs(target - probs), target)   # [B, C]
    present = tf.cast(tf.reduce_sum(target, axis=-1) > 0, tf.float32)
    return tf.reduce_sum(per_class * present, axis=-1) / tf.maximum(
        tf.reduce_sum(present, axis=-1), 1.0)


def _lovasz(labels, logits) -> tf.Tensor:
    """Lovasz hinge for one channel, Lovasz-softmax otherwise."""
    if logits.shape[-1] == 1:
        return lovasz_hinge(labels, logits)
    return lovasz_softmax(labels, logits)


# --------------------------------------------------------------------------
# pos_weight

def pos_weight_from_prevalence(prevalence, max_weight: float = 50.0) -> np.ndarray:
    """Per-label positive weights (1 - p) / p, clipped to [1, max_weight].

    (1 - p) / p makes a label's positives weigh as much in total as its
    negatives. The floor of 1 leaves common labels (p > 0.5, the two ~90%
    labels here) unweighted instead of down-weighting them; the ceiling keeps
    a label seen a handful of times (or never, p = 0) from dominating the
    gradient -- at 1% prevalence the raw weight would be 99.
    """
    p = np.asarray(prevalence, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise LossError(f"--pos_weight=auto: label prevalence must be a non-empty vector, "
                        f"got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise LossError("--pos_weight=auto: label prevalence must lie in [0, 1]")
    if not max_weight >= 1:
        raise LossError(f"--pos_weight=auto: max_weight must be >= 1, got {max_weight}")
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.where(p > 0, (1.0 - p) / np.where(p > 0, p, 1.0), np.inf)
    return np.clip(raw, 1.0, max_weight).astype(np.float32)


def parse_pos_weight(text: Optional[str], num_labels: int, prevalence=None, *,
                     max_weight: float = 50.0) -> Optional[np.ndarray]:
    """--pos_weight text -> weights [num_labels], or None when unset.

    "" / None / "none": no weights. "auto": pos_weight_from_prevalence of the
    training labels' prevalence. "w1,...,wL": explicit weights; a single value
    applies to every label.
    """
    if text is None:
        return None
    text = str(text).strip()
    if text.lower() in ("", "none"):
        return None
    if text.lower() == "auto":
        if prevalence is None:
            raise LossError("--pos_weight=auto needs the label prevalence of the training data, "
                            "which is not known for this dataset; pass explicit weights")
        weights = pos_weight_from_prevalence(prevalence, max_weight=max_weight)
        if weights.shape != (num_labels,):
            raise LossError(f"--pos_weight=auto: prevalence has {weights.size} values "
                            f"but there are {num_labels} labels")
        return weights
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise LossError(f"--pos_weight={text!r}: expected 'auto' or comma-separated numbers") \
            from None
    if len(values) == 1:
        values = values * num_labels
    weights = np.asarray(values, np.float32)
    _check_pos_weight(weights, num_labels)
    return weights


def _check_pos_weight(weights: np.ndarray, num_labels: int) -> None:
    if weights.shape != (num_labels,):
        raise LossError(f"--pos_weight has {weights.size} values but there are "
                        f"{num_labels} labels (give one per label, or 'auto')")
    if not np.all(np.isfinite(weights)):
        raise LossError("--pos_weight values must be finite numbers")
    if np.any(weights < 0):
        raise LossError(f"--pos_weight values must be >= 0, got {weights.min():g}")


# --------------------------------------------------------------------------
# the factory

_TERM = re.compile(
    r"^\s*(?:(?P<weight>(?:\d+\.?\d*|\.\d+)(?:[eE]-?\d+)?)\s*\*\s*)?(?P<name>[A-Za-z_]+)\s*$")


def _parse_spec(spec: str) -> List[Tuple[Optional[float], str]]:
    """ "0.5*ce+lovasz" -> [(0.5, "ce"), (None, "lovasz")]."""
    if not isinstance(spec, str) or not spec.strip():
        raise LossError(f"--loss must name a loss, got {spec!r}")
    terms, seen = [], set()
    for part in spec.split("+"):
        m = _TERM.match(part)
        if not m:
            raise LossError(f"--loss={spec}: cannot read term {part.strip()!r} "
                            f"(write NAME or WEIGHT*NAME, joined by '+')")
        name = m.group("name").lower()
        if name not in _NAME_TASKS:
            raise LossError(f"--loss={spec}: unknown loss {name!r}; "
                            f"choose from {', '.join(LOSS_NAMES)}, or a sum such as bce+fbeta "
                            f"or 0.5*bce+fbeta")
        if name in seen:
            raise LossError(f"--loss={spec}: {name!r} appears twice")
        seen.add(name)
        weight = m.group("weight")
        terms.append((None if weight is None else float(weight), name))
    return terms


def _checked_terms(spec: str, *, num_labels, pos_weight, focal_gamma, focal_alpha, fbeta,
                   label_smoothing, fbeta_weight, task):
    """make_loss's argument checks: returns (terms, their names, pos_weight as float32).

    Every refusal is a LossError naming the flag, before any tensor is made.
    """
    if task not in TASKS:
        raise LossError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise LossError(f"number of labels must be a positive integer, got {num_labels!r}")
    terms = _parse_spec(spec)
    names = [name for _, name in terms]
    for name in names:
        if task not in _NAME_TASKS[name]:
            valid = [n for n, tasks in _NAME_TASKS.items() if task in tasks]
            raise LossError(f"--loss={spec}: {name!r} does not fit the {task} task; "
                            f"choose from {', '.join(valid)}")
    for weight, name in terms:
        if weight is not None and not (math.isfinite(weight) and weight >= 0):
            raise LossError(f"--loss={spec}: weight of {name!r} must be >= 0")

    if not (math.isfinite(focal_gamma) and focal_gamma >= 0):
        raise LossError(f"--focal_gamma must be >= 0, got {focal_gamma}")
    if focal_alpha is not None and not 0.0 <= focal_alpha <= 1.0:
        raise LossError(f"--focal_alpha must be in [0, 1], got {focal_alpha}")
    if not (math.isfinite(fbeta) and fbeta > 0):
        raise LossError(f"--fbeta must be > 0, got {fbeta}")
    if not 0.0 <= fbeta_weight <= 1.0:
        raise LossError(f"--fbeta_weight must be in [0, 1], got {fbeta_weight}")
    if not 0.0 <= label_smoothing < 1.0:
        raise LossError(f"--label_smoothing must be in [0, 1), got {label_smoothing}")
    if label_smoothing and not any(n in _SMOOTHABLE for n in names):
        raise LossError(f"--label_smoothing={label_smoothing:g} has no effect with --loss={spec}; "
                        f"it applies to {', '.join(_SMOOTHABLE)}")

    if pos_weight is not None:
        if "weighted_bce" not in names:
            raise LossError(f"--pos_weight is only used by --loss=weighted_bce, not --loss={spec}")
        pos_weight = np.asarray(pos_weight, dtype=np.float32).reshape(-1)
        _check_pos_weight(pos_weight, int(num_labels))
    elif "weighted_bce" in names:
        raise LossError("--loss=weighted_bce needs --pos_weight (auto, or one weight per label)")
    return terms, names, pos_weight


def make_loss(spec: str, *, num_labels: int, pos_weight=None, focal_gamma: float = 2.0,
              focal_alpha: Optional[float] = 0.25, fbeta: float = 2.0,
              label_smoothing: float = 0.0, fbeta_weight: float = 0.5,
              task: str = "multilabel") -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Builds the loss named by spec: a callable (labels, logits) -> [B] float32.

    spec is one name or a '+'-joined sum of optionally weighted names:
    "bce", "weighted_bce", "focal", "fbeta", "cce", "sparse_cce", "ce",
    "dice", "lovasz", "ce+lovasz", "0.5*ce+lovasz". Unweighted terms weigh 1,
    except that exactly two unweighted terms one of which is fbeta (e.g.
    "bce+fbeta") blend as (1 - fbeta_weight) * other + fbeta_weight * fbeta.

    num_labels is the size of the logits' last axis (labels or classes) and
    is checked when the loss is first called. pos_weight (a vector of
    num_labels floats, see parse_pos_weight) is required by weighted_bce and
    refused by every other spec. label_smoothing applies to the cross-entropy
    terms (bce, weighted_bce, cce, sparse_cce, ce); the others see hard labels.
    task picks the meaning of "focal" (sigmoid for multilabel, softmax for
    multiclass) and which names are allowed.

    Raises LossError with a one-line message naming the offending flag.
    """
    terms, names, pos_weight = _checked_terms(
        spec, num_labels=num_labels, pos_weight=pos_weight, focal_gamma=focal_gamma,
        focal_alpha=focal_alpha, fbeta=fbeta, label_smoothing=label_smoothing,
        fbeta_weight=fbeta_weight, task=task)
    unweighted = [w is None for w, _ in terms]
    if len(terms) == 2 and all(unweighted) and "fbeta" in names:
        weights = [fbeta_weight if n == "fbeta" else 1.0 - fbeta_weight for n in names]
    else:
        weights = [1.0 if w is None else w for w, _ in terms]

    ls, gamma = float(label_smoothing), float(focal_gamma)
    alpha = None if focal_alpha is None else float(focal_alpha)
    parts: Dict[str, Callable] = {
        "bce": lambda y, x: binary_cross_entropy(y, x, ls),
        "weighted_bce": lambda y, x: weighted_binary_cross_entropy(y, x, pos_weight, ls),
        "focal": ((lambda y, x: softmax_focal(y, x, gamma, alpha)) if task == "multiclass"
                  else (lambda y, x: sigmoid_focal(y, x, gamma, alpha))),
        "fbeta": lambda y, x: soft_fbeta(y, x, float(fbeta)),
        "cce": lambda y, x: categorical_cross_entropy(y, x, ls),
        "sparse_cce": lambda y, x: sparse_categorical_cross_entropy(y, x, ls),
        "ce": lambda y, x: segmentation_cross_entropy(y, x, ls),
        "dice": soft_dice,
        "lovasz": _lovasz,
    }
    chosen = [(w, n, parts[n]) for w, n in zip(weights, names)]
    expected_rank = 4 if task == "segmentation" else 2
    normalized = "+".join(f"{w:g}*{n}" for w, n, _ in chosen)

    def loss_fn(labels, logits):
        logits = tf.convert_to_tensor(logits)
        labels = tf.convert_to_tensor(labels)
        if logits.shape.rank is not None and logits.shape.rank != expected_rank:
            raise LossError(f"--loss={spec}: the {task} task wants logits of rank "
                            f"{expected_rank}, got shape {logits.shape}")
        channels = logits.shape[-1] if logits.shape.rank else None
        if channels is not None and channels != num_labels:
            raise LossError(f"--loss={spec}: logits have {channels} outputs but there are "
                            f"{num_labels} labels")
        if task == "multilabel" and not labels.shape.is_compatible_with(logits.shape):
            raise LossError(f"--loss={spec}: labels of shape {labels.shape} do not match "
                            f"logits of shape {logits.shape}")
        total = None
        for weight, _, fn in chosen:
            value = fn(labels, logits)
            value = value if weight == 1.0 else weight * value
            total = value if total is None else total + value
        return total

    loss_fn.__name__ = "loss_" + "_".join(names)
    loss_fn.spec = normalized
    loss_fn.task = task
    loss_fn.terms = tuple((w, n) for w, n, _ in chosen)
    return loss_fn
