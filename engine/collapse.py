"""Early warnings that training has collapsed: warnings, never errors.

The users' failure: on 13 labels, two of them in ~90% of images, the model
learnt to answer "the two common labels, nothing else" for every image. The
loss still goes down and nothing crashes, so the engine must say so. Each
check here is a pure function (or a tiny stateful monitor) returning a list
of human-readable warning strings, empty when all is well; the trainer
prints and logs them.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["check_prediction_collapse", "GradientVanishingMonitor", "check_output_activation"]

_REMEDY = ("try --loss=weighted_bce --pos_weight=auto (or --loss=bce+fbeta) "
           "or check the learning rate")


def check_prediction_collapse(probs_std_per_label, mean_probs,
                              label_names: Optional[Sequence[str]] = None, *,
                              std_floor: float = 1e-3, saturation: float = 1e-4,
                              remedy: Optional[str] = None, what: str = "label",
                              logit_std_floor: Optional[float] = None) -> List[str]:
    """Warns for each label whose validation predictions do not depend on the image.

    probs_std_per_label / mean_probs: the std and mean of each label's
    predicted probability over a validation pass (see
    MultiLabelEvaluator.prediction_stats). A label is flagged when its mean
    sits within ``saturation`` of 0 or 1 (never / always predicted) or its
    std is below ``std_floor`` (the same answer for every image: the model
    outputs the label's prior). The saturation bound is small on purpose:
    a label with 1% prevalence legitimately has a mean around 0.01.
    remedy / what: the advice ending each warning and the word for an output
    (segmentation passes its own advice and "class").

    logit_std_floor: judge "barely varies" on the logit scale instead, as
    std < logit_std_floor * mean * (1 - mean) (the delta method: a logit
    spread of d moves p by about p (1 - p) d). A fixed std_floor on
    probabilities flags healthy rare labels -- at mean 0.01 a logit spread
    of 0.07 is a probability std of 7e-4 -- while letting near-constant
    common labels pass; 0.01 on logits equals std_floor=1e-3 at p = 0.9.
    """
    remedy = _REMEDY if remedy is None else remedy
    std = np.asarray(probs_std_per_label, np.float64).reshape(-1)
    mean = np.asarray(mean_probs, np.float64).reshape(-1)
    if std.shape != mean.shape:
        raise ValueError(f"{std.size} stds for {mean.size} means")
    names = (list(label_names) if label_names is not None
             else [f"label_{i}" for i in range(std.size)])
    if len(names) != std.size:
        raise ValueError(f"{len(names)} label names for {std.size} labels")
    warnings = []
    for name, s, m in zip(names, std, mean):
        if not (math.isfinite(s) and math.isfinite(m)):
            warnings.append(f"{what} '{name}': predictions are NaN or inf — the model has "
                            f"diverged; lower the learning rate")
        elif m <= saturation:
            warnings.append(f"{what} '{name}': predictions sit at ~0 (mean {m:.1e}) — the "
                            f"{what} is never predicted, the model learnt it is rare; {remedy}")
        elif m >= 1.0 - saturation:
            warnings.append(f"{what} '{name}': predictions sit at ~1 (mean {m:.6f}) — the "
                            f"{what} is predicted for every image, the model learnt it is common; "
                            f"{remedy}")
        elif s < (std_floor if logit_std_floor is None else logit_std_floor * m * (1.0 - m)):
            warnings.append(f"{what} '{name}': predictions barely vary (std {s:.0e}, mean {m:.3f}) "
                            f"— the model predicts the prior; {remedy}")
    return warnings


class GradientVanishingMonitor:
    """Warns once when the global gradient norm stays under ``floor`` for ``patience`` steps.

    One small norm is normal (a batch that is already fitted); a long run of
    them means nothing is training: sigmoid/softmax in the model's head
    saturating a logits loss, a frozen model, or a decayed learning-rate
    schedule. It warns once per such run: when the norm comes back above the
    floor the count restarts. Non-finite norms are not "vanishing" (another
    guard handles them) and also restart the count.
    """

    def __init__(self, floor: float = 1e-7, patience: int = 100):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.floor = float(floor)
        self.patience = int(patience)
        self.steps = 0          # updates seen
        self.run_length = 0     # consecutive updates under the floor
        self._warned = False

    def update(self, global_grad_norm: float, step: Optional[int] = None) -> List[str]:
        """Feeds one step's global gradient norm; returns [] or one warning."""
        self.steps += 1
        norm = float(global_grad_norm)
        if not (math.isfinite(norm) and norm < self.floor):
            self.run_length, self._warned = 0, False
            return []
        self.run_length += 1
        if self.run_length >= self.patience and not self._warned:
            self._warned = True
            where = f"step {step}" if step is not None else f"update {self.steps}"
            return [f"gradient norm stayed below {self.floor:.0e} for {self.run_length} steps "
                    f"(last {norm:.1e}, at {where}) — nothing is training: check that the head "
                    f"outputs logits (no sigmoid/softmax), that some layers are trainable, "
                    f"and the learning rate"]
        return []


_SQUASHING = ("sigmoid", "softmax", "hard_sigmoid")


def _last_layer(model):
    """The layer producing the output, looking inside nested models."""
    layer = model
    for _ in range(32):   # nesting depth guard
        layers = getattr(layer, "layers", None)
        if not layers:
            return layer
        layer = layers[-1]
    return layer


def _squashing_name(layer) -> Optional[str]:
    activation = getattr(layer, "activation", None)
    if activation is not None:
        name = getattr(activation, "__name__", str(activation)).lower()
        if name in _SQUASHING:
            return name
    cls = type(layer).__name__.lower()
    if cls in _SQUASHING:  # keras.layers.Softmax has no activation attribute
        return cls
    return None


def check_output_activation(model) -> List[str]:
    """Warns when the model's last layer applies sigmoid/softmax.

    Every loss in engine.losses takes logits. Probabilities fed to them are
    squeezed into [0, 1]: the loss can never approach 0 and the gradients
    through the saturated activation vanish -- a silent, common cause of the
    "predicts the prior" collapse. Apply sigmoid/softmax only at the edges
    (metrics, prediction, export).
    """
    layer = _last_layer(model)
    name = _squashing_name(layer)
    if name is None:
        return []
    return [f"the model's last layer '{getattr(layer, 'name', '?')}' applies {name}, but the "
            f"losses take logits — they would see probabilities and gradients vanish; build "
            f"the head with activation=None and apply {name} only for prediction and export"]
