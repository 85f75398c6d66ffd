"""Which variables train in which phase.

A run has at most two phases: "frozen" (backbone fixed, epochs before
--unfreeze_at) and "unfrozen". Setting `trainable` on Keras 3 layers also
puts frozen BatchNormalization into inference mode (moving statistics used,
never updated), which is what fine-tuning wants. A traced step does not see
a change of `trainable`, so the trainer retraces whenever the phase changes.
"""
from __future__ import annotations

import re
from typing import List, Sequence

import keras

FROZEN, UNFROZEN = "frozen", "unfrozen"


def phase_for_epoch(epoch: int, unfreeze_at: int) -> str:
    """epoch is 0-based: --unfreeze_at=5 freezes epochs 0..4 (the first five)."""
    return FROZEN if epoch < unfreeze_at else UNFROZEN


def thawed_layer_names(blocks: Sequence[Sequence[str]], unfreeze_layers: str) -> List[str]:
    """The backbone layers that train after unfreezing.

    unfreeze_layers: "all", "blocks:K" (the last K blocks) or "regex:PATTERN"
    (layers whose name matches).
    """
    names = [n for block in blocks for n in block]
    if unfreeze_layers == "all":
        return names
    if unfreeze_layers.startswith("blocks:"):
        k = int(unfreeze_layers.split(":", 1)[1])
        return [n for block in blocks[-k:] for n in block]
    pattern = re.compile(unfreeze_layers.split(":", 1)[1])
    return [n for n in names if pattern.search(n)]


def apply_phase(model, phase: str, *, thawed: Sequence[str], freeze_bn: bool) -> None:
    """Sets `trainable` on the backbone's layers for the phase."""
    backbone = model.get_layer("backbone")
    if phase == FROZEN:
        backbone.trainable = False
        return
    # Keras 3 sets every sublayer only when the value changes: True on an
    # already-trainable backbone would leave earlier per-layer choices in place.
    backbone.trainable = False
    backbone.trainable = True
    thawed = set(thawed)
    for layer in backbone.layers:
        keep = layer.name in thawed
        if freeze_bn and isinstance(layer, keras.layers.BatchNormalization):
            keep = False
        if not keep:
            layer.trainable = False


def trainable_in_every_phase(model) -> dict:
    """Variables each group could ever train: {"head": [...], "backbone": [...]}.

    Found by briefly making everything trainable; the caller applies the real
    phase afterwards.
    """
    backbone = model.get_layer("backbone")
    model.trainable = True
    backbone_ids = {id(v) for v in backbone.trainable_variables}
    groups = {"backbone": list(backbone.trainable_variables),
              "head": [v for v in model.trainable_variables if id(v) not in backbone_ids]}
    return groups


def changing_weights(model):
    """Weights that change while training in the current phase.

    Trainable variables, plus BatchNorm moving statistics of BN layers that
    run in training mode (trainable ones).
    """
    changing = list(model.trainable_variables)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            changing += [layer.moving_mean, layer.moving_variance]
    return changing
