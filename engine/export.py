"""--mode=export: the newest checkpoint as a SavedModel for serving.

    python train_main.py --mode=export --flagfile=runs/x/flags.txt
      -> runs/x/export/<global_step>/   (a SavedModel)

The serving signature `serving_default` takes `images`, float32
[None, S, S, 3] pixel values in 0..255 (preprocessing is inside the model),
and returns `probabilities` (sigmoid per label for multilabel, softmax for
multiclass: principle 5, probabilities at the edges) and, when the run wrote
model_dir/thresholds.json, `decisions` (probabilities >= each label's
threshold, as float32 0/1). With EMA on, the EMA weights are exported unless
--export_raw. Export always runs on one device: the SavedModel then holds
plain variables, whatever strategy trained it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

import numpy as np
import tensorflow as tf

from engine.config import Config
from engine.metrics import ThresholdFileError, load_thresholds
from engine.state import StateError, checkpoint_is_readable, existing_checkpoints, list_keys

SIGNATURE = "serving_default"


class ServingModule(tf.Module):
    """Pixels in, probabilities (and decisions) out: what the SavedModel serves."""

    def __init__(self, model, input_size: int, *, multiclass: bool,
                 thresholds: Optional[np.ndarray] = None):
        super().__init__(name="tapeworks_serving")
        self.model = model
        self.multiclass = multiclass
        self.thresholds = (None if thresholds is None
                           else tf.constant(np.asarray(thresholds, np.float32)))
        spec = tf.TensorSpec([None, input_size, input_size, 3], tf.float32, name="images")
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, images):
        logits = self.model(images, training=False)
        probs = tf.nn.softmax(logits) if self.multiclass else tf.sigmoid(logits)
        out = {"probabilities": probs}
        if self.thresholds is not None:
            out["decisions"] = tf.cast(probs >= self.thresholds, tf.float32)
        return out


def export_saved_model(config: Config) -> str:
    """Restores the newest checkpoint of config's model_dir and writes a SavedModel.

    Returns one line saying what was written where. Raises StateError (one
    line naming --model_dir or the file) when there is nothing to export.
    """
    from engine.trainer import Trainer  # the trainer builds model, EMA and named state

    config = config.validated()
    if config.train.strategy != "default" or config.train.num_virtual_cpus:
        config = config.replace(train={"strategy": "default", "num_virtual_cpus": 0})
    model_dir = os.path.abspath(os.path.expanduser(config.train.model_dir))
    checkpoints = existing_checkpoints(os.path.join(model_dir, "checkpoints"))
    if not checkpoints:
        raise StateError(f"--model_dir={config.train.model_dir} has no checkpoint to export "
                         f"(nothing in {os.path.join(model_dir, 'checkpoints')}); train first")
    trainer = Trainer(config)
    restored = trainer.restore()  # the newest readable checkpoint, or StateError
    path = next(p for p in checkpoints if checkpoint_is_readable(p))
    in_file = set(list_keys(path))

    use_ema = trainer.ema is not None and not config.train.export_raw
    if use_ema:
        missing = [k for k in trainer.state.keys if k.startswith("ema/") and k not in in_file]
        if missing:
            raise StateError(f"checkpoint {path} has no EMA weights (e.g. {missing[0]}); "
                             f"pass --export_raw or --ema_decay=0 to export the raw weights")

    thresholds = None
    thresholds_path = os.path.join(model_dir, "thresholds.json")
    if os.path.exists(thresholds_path):
        try:
            thresholds, _ = load_thresholds(thresholds_path, trainer.data.label_names)
        except ThresholdFileError as e:
            raise StateError(str(e)) from None

    step = int(trainer.global_step.numpy())
    size = config.model.input_size
    module = ServingModule(trainer.model, size,  # segmentation: softmax over each pixel's classes
                           multiclass=config.model.task in ("multiclass", "segmentation"),
                           thresholds=thresholds)
    target = os.path.join(model_dir, "export", str(step))
    if use_ema:
        with trainer.ema.swapped():
            _save_atomically(module, target)
    else:
        _save_atomically(module, target)

    which = "EMA" if use_ema else "raw"
    if trainer.ema is None and any(k.startswith("ema/") for k in in_file):
        which += " (the checkpoint also holds EMA weights: pass --ema_decay to export those)"
    outputs = "probabilities" + (", decisions" if thresholds is not None else "")
    warnings = restored[:restored.index("resumed:")] if "resumed:" in restored else ""
    return (f"{warnings}exported {which} weights of step {step} to {target} ({SIGNATURE}: "
            f"images float32 [None,{size},{size},3] 0..255 -> {outputs})")


def _save_atomically(module: ServingModule, target: str) -> None:
    """Writes the SavedModel next to target, then moves it into place."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}-")
    try:
        tf.saved_model.save(module, scratch, signatures={SIGNATURE: module.serve})
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
