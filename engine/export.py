"""--mode=export: a checkpoint as a SavedModel that serves what was validated.

    python train_main.py --mode=export --flagfile=runs/x/flags.txt
      -> runs/x/export/<global_step>/   (SavedModel + model.keras + labels.txt + thresholds.json)

Which checkpoint: --export_from=best (default; model_dir/best/, the one
--best_metric picked, or the latest with a note when best/ is empty), latest
(the newest readable one in model_dir/checkpoints/) or a checkpoint prefix.
Which weights: the EMA ones when --ema_decay is on, unless --export_raw.

Signatures:
* `serving_default` takes `images`, float32 [None, S, S, 3] pixel values in
  0..255 (preprocessing is inside the model), and returns `probabilities`
  (sigmoid per label for multilabel, softmax for multiclass and per pixel
  for segmentation: principle 5, probabilities at the edges) and, except for
  segmentation, `decisions` (probabilities >= each label's threshold, as
  float32 0/1).
* `serving_bytes` takes `image_bytes`, tf.string [None] (PNG or JPEG files,
  any size), decodes and resizes them with validation's own function
  (engine/data/decode.py decode_for_eval) and returns the same outputs: a
  client need not know the resize method.
* `metadata` takes nothing and returns `label_names`, `thresholds` (when
  there are decisions), `threshold_objective`, `weights` ("ema"/"raw") and
  `step`; the same values are constants on the loaded object
  (`loaded.label_names`, `loaded.thresholds`). A server needs nothing else.

model.keras: the same weights as a Keras model, pixels -> probabilities
(probabilities_model), for `keras.models.load_model(path)` with no
tapeworks import (only built-in layers and ops; the legacy-format SavedModel
is refused by load_model). Same outputs as serving_default's probabilities.

Thresholds are searched at export time, with one pass over the validation
split on the exact weights being written, by --threshold_objective and
--fbeta. The files training leaves in model_dir (thresholds.json for the raw
model, thresholds_ema.json for the EMA model) belong to the last evaluated
epoch, and best/ usually holds an earlier one, so no file written during
training is guaranteed to fit. The pass is cheap next to training (BUILD_NOTES).

The model is built and restored here, by key, without a Trainer: export
needs no optimizer, no strategy and no backbone download (every weight comes
from the checkpoint). Export always runs on one device: the SavedModel holds
plain variables, whatever strategy trained it. Everything written is
readable by other users (directories 0755, files 0644), for a serving user.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from typing import Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from engine.calibration import BNCalibrator, training_batches
from engine.config import Config
from engine.data import open_data
from engine.data.decode import decode_for_eval
from engine.evaluation import search_validation_thresholds
from engine.metrics import save_thresholds
from engine.state import (StateError, TrainingState, checkpoint_is_readable,
                          existing_checkpoints, list_keys, model_variable_keys)
from models import build_model

SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serving_bytes"
METADATA_SIGNATURE = "metadata"
KERAS_FILE = "model.keras"


class ServingModule(tf.Module):
    """Pixels in, probabilities (and decisions) out, plus the labels and thresholds it serves."""

    def __init__(self, model, input_size: int, *, multiclass: bool, label_names=(),
                 thresholds: Optional[np.ndarray] = None, objective: str = "",
                 weights: str = "", step: int = 0):
        super().__init__(name="tapeworks_serving")
        self.model = model
        self.multiclass = multiclass
        # Variables, not constants: a SavedModel keeps a module's variables as
        # attributes of the loaded object, but drops its constant tensors.
        self.label_names = _fixed([str(n) for n in label_names], tf.string)
        self.thresholds = (None if thresholds is None
                           else _fixed(np.asarray(thresholds, np.float32), tf.float32))
        self.threshold_objective = _fixed(objective if thresholds is not None else "", tf.string)
        self.weights = _fixed(weights, tf.string)
        self.step = _fixed(int(step), tf.int64)
        self.input_size = input_size
        spec = tf.TensorSpec([None, input_size, input_size, 3], tf.float32, name="images")
        self.serve = tf.function(self._serve, input_signature=[spec])
        self.serve_bytes = tf.function(self._serve_bytes, input_signature=[
            tf.TensorSpec([None], tf.string, name="image_bytes")])
        self.metadata = tf.function(self._metadata, input_signature=[])

    def _serve(self, images):
        logits = self.model(images, training=False)
        probs = tf.nn.softmax(logits) if self.multiclass else tf.sigmoid(logits)
        out = {"probabilities": probs}
        if self.thresholds is not None:
            out["decisions"] = tf.cast(probs >= self.thresholds, tf.float32)
        return out

    def _serve_bytes(self, image_bytes):
        """Encoded PNG/JPEG files in, decoded and resized exactly as validation does."""
        size = self.input_size

        def decode(args):
            data, index = args
            return decode_for_eval(data, size, tf.strings.join(
                ["serving_bytes image_bytes[", tf.strings.as_string(index), "]"]))

        indices = tf.range(tf.shape(image_bytes, out_type=tf.int64)[0])
        images = tf.map_fn(decode, (image_bytes, indices),
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        return self._serve(images)

    def _metadata(self):
        out = {"label_names": self.label_names, "threshold_objective": self.threshold_objective,
               "weights": self.weights, "step": self.step}
        if self.thresholds is not None:
            out["thresholds"] = self.thresholds
        return {k: tf.identity(v) for k, v in out.items()}


def _fixed(value, dtype) -> tf.Variable:
    return tf.Variable(value, dtype=dtype, trainable=False)


@dataclasses.dataclass
class Restored:
    """What export restored: from where, which weights, and the counters it read."""
    path: str
    origin: str          # why this checkpoint, for the export line
    weights: str         # "ema" or "raw"
    step: int
    best_metric: float   # the checkpoint's train/best_metric (NaN: none recorded)
    notes: str = ""      # warnings and hints for the export line


def export_saved_model(config: Config) -> str:
    """Restores the checkpoint --export_from names and writes a SavedModel next to it.

    Returns one line saying which checkpoint (path and step) and which
    weights went where. Raises StateError (one line naming the flag or the
    file) when there is nothing fit to export.
    """
    c = config.validated()
    model_dir = os.path.abspath(os.path.expanduser(c.train.model_dir))
    checkpoint = pick_checkpoint(model_dir, c.train.export_from)  # before the data: fails fast
    data = open_run_data(c)
    model, restored = restore_serving_model(c, data.num_labels, checkpoint)
    if restored.weights == "ema" and c.train.ema_calibrate_bn:
        restored.notes += _calibrate_ema_statistics(model, data, c)
    multiclass = c.model.task in ("multiclass", "segmentation")
    thresholds, scores = serving_thresholds(model, data, c)
    size = c.model.input_size
    module = ServingModule(model, size, multiclass=multiclass, label_names=data.label_names,
                           thresholds=thresholds, objective=c.train.threshold_objective,
                           weights=restored.weights, step=restored.step)
    target = os.path.join(model_dir, "export", str(restored.step))
    _save_atomically(module, target, data.label_names, thresholds, c, restored)
    outputs, meta = (("probabilities", "label_names") if thresholds is None else
                     ("probabilities, decisions", "label_names, thresholds"))
    return (f"exported {'EMA' if restored.weights == 'ema' else 'raw'} weights of step "
            f"{restored.step} from {restored.path} ({restored.origin}) to {target} "
            f"({SIGNATURE}: images float32 [None,{size},{size},3] 0..255 -> {outputs}; "
            f"{BYTES_SIGNATURE}: image_bytes string [None] PNG/JPEG -> the same; "
            f"{METADATA_SIGNATURE}: {meta}; {KERAS_FILE}: keras.models.load_model, "
            f"pixels -> probabilities){scores}{restored.notes}")


def open_run_data(c: Config):
    """The run's data as the flags describe it: label names, and the val split thresholds need."""
    return open_data(c.data.data_dir, os.path.expanduser(c.data.cache_dir), seed=c.train.seed,
                     task=c.model.task, skip_bad_records=c.data.skip_bad_records)


def restore_serving_model(c: Config, num_labels: int, checkpoint: Tuple[str, str]):
    """(model, Restored): the run's model with the checkpoint's weights (--export_raw: which).

    checkpoint: (prefix, why), from pick_checkpoint (--export_from).
    Built with no backbone download and no synchronized BN (every weight
    comes from the checkpoint; serving has one replica's view). Build it
    under a strategy's scope to run it on several replicas (--mode=predict).
    """
    path, origin = checkpoint
    model = build_model(c.model.backbone, c.model.input_size, num_labels, task=c.model.task,
                        weights=None, dropout=c.model.dropout, sync_bn=False, seed=c.train.seed,
                        bn_momentum=c.model.bn_momentum, seg_model=c.model.seg_model,
                        unet_depth=c.model.unet_depth, unet_filters=c.model.unet_filters)
    return model, restore_for_serving(model, path, origin, c)


def serving_thresholds(model, data, c: Config):
    """(thresholds or None, text for the output line): searched now, on the restored weights.

    Segmentation has no per-label decisions; a split without validation
    examples has nothing to search on, and the line says so. Export and
    predict both call this, so predicted tags are the exported decisions.
    """
    if c.model.task == "segmentation":
        return None, ""
    if not getattr(data, "num_val", 1):
        return None, "; no validation examples: no thresholds searched, so no decisions"
    thresholds, metrics = search_validation_thresholds(
        model, data, input_size=c.model.input_size, batch_size=c.train.batch_size,
        fbeta=c.loss.fbeta, objective=c.train.threshold_objective,
        multiclass=c.model.task == "multiclass")
    b = f"{c.loss.fbeta:g}"
    return thresholds, (f"; thresholds searched now on val with these weights for "
                        f"--threshold_objective={c.train.threshold_objective}: val F{b} "
                        f"samples {metrics[f'f{b}_samples']:.4f}, macro "
                        f"{metrics[f'f{b}_macro']:.4f}")


def _calibrate_ema_statistics(model, data, c: Config) -> str:
    """--ema_calibrate_bn: the EMA weights get BN statistics measured with them.

    Averaged weights and averaged statistics do not belong together; the
    exported model is the one the EMA evaluation with --ema_calibrate_bn
    measured (same training batches: the first N of epoch 0).
    """
    steps = c.ema_calibration_steps()
    batches = training_batches(data, steps=steps, global_batch=c.train.batch_size,
                               input_size=c.model.input_size, seed=c.train.seed,
                               augment=c.data.augment)
    done = BNCalibrator(model)(batches, steps)
    return (f"; BN statistics re-estimated for the EMA weights over {done} training batches "
            f"(--ema_calibrate_bn)")


def pick_checkpoint(model_dir: str, export_from: str) -> Tuple[str, str]:
    """(checkpoint prefix, why it was picked) for --export_from=best|latest|PATH.

    best/ holds one checkpoint, written when --best_metric improved; a run
    killed before its first evaluation, or one whose metric was never finite,
    has none, so best falls back to the latest and says so. Unreadable
    checkpoints (a save cut short) are skipped, and named.
    """
    if export_from not in ("best", "latest"):
        path = os.path.abspath(os.path.expanduser(export_from))
        if os.path.isdir(path):
            path = tf.train.latest_checkpoint(path) or path
        if not checkpoint_is_readable(path):
            raise StateError(f"--export_from={export_from} is not a readable checkpoint (give "
                             f"best, latest, or a prefix such as {model_dir}/checkpoints/ckpt-N)")
        return path, "--export_from"
    skipped = []
    if export_from == "best":
        path = _newest_readable(os.path.join(model_dir, "best"), skipped)
        if path is not None:
            return path, "best by --best_metric" + _skipped_note(skipped)
    latest = _newest_readable(os.path.join(model_dir, "checkpoints"), skipped)
    if latest is None:
        raise StateError(f"--model_dir={model_dir} has no checkpoint to use (nothing "
                         f"readable in {os.path.join(model_dir, 'checkpoints')}"
                         f"{_skipped_note(skipped)}); train first")
    why = "latest" if export_from == "latest" else \
        f"latest: {os.path.join(model_dir, 'best')} has no readable checkpoint"
    return latest, why + _skipped_note(skipped)


def _newest_readable(directory: str, skipped: list) -> Optional[str]:
    for path in existing_checkpoints(directory):
        if checkpoint_is_readable(path):
            return path
        skipped.append(path)
    return None


def _skipped_note(skipped) -> str:
    return "".join(f"; skipped unreadable {p}" for p in skipped)


def restore_for_serving(model, path: str, origin: str, config: Config) -> Restored:
    """Assigns the checkpoint's model weights, then its EMA shadows when EMA is exported.

    By key (engine/state.py): `model/<key>` for every variable, `ema/<key>`
    over each weight when --ema_decay is on and --export_raw is not given.
    """
    t = config.train
    keys = model_variable_keys(model)
    weights = TrainingState()
    weights.add_all("model", {keys[id(v)]: v for v in model.variables})
    counters = {"global_step": tf.Variable(0, dtype=tf.int64),
                "best_metric": tf.Variable(np.nan, dtype=tf.float64)}
    weights.add_all("train", counters)
    report = weights.restore(path)
    lost = [k for k in report.missing + report.shape_mismatch if k.startswith("model/")]
    notes = ""
    if lost and not t.allow_partial_restore:
        raise StateError(f"checkpoint {path} does not fit this model ({len(lost)} model tensors "
                         f"missing or of another shape, e.g. {lost[0]}); check --backbone, "
                         f"--input_size and --task, or pass --allow_partial_restore")
    if lost:
        notes += f"; WARNING: {len(lost)} model tensors not in the checkpoint (fresh), e.g. {lost[0]}"
    in_file = list_keys(path)
    use_ema = bool(t.ema_decay) and not t.export_raw
    if use_ema:
        shadows = TrainingState()
        shadows.add_all("ema", {keys[id(w)]: w for w in model.weights})
        missing = shadows.restore(path).missing
        if missing:
            raise StateError(f"checkpoint {path} has no EMA weights (e.g. {missing[0]}); "
                             f"pass --export_raw or --ema_decay=0 to export the raw weights")
    elif not t.ema_decay and any(k.startswith("ema/") for k in in_file):
        notes += " (the checkpoint also holds EMA weights: pass --ema_decay to export those)"
    best = float(counters["best_metric"].numpy())
    if origin.startswith("best") and np.isfinite(best):
        origin = origin.replace("--best_metric", f"--best_metric, {best:.4g}", 1)
    return Restored(path=path, origin=origin, weights="ema" if use_ema else "raw",
                    step=int(counters["global_step"].numpy()), best_metric=best, notes=notes)


def _save_atomically(module: ServingModule, target: str, label_names, thresholds,
                     config: Config, restored: Restored) -> None:
    """Writes SavedModel, model.keras, labels.txt and thresholds.json next to target, then moves them in."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    os.chmod(parent, 0o755)
    with atomic_directory(target) as scratch:
        tf.saved_model.save(module, scratch, signatures={
            SIGNATURE: module.serve, BYTES_SIGNATURE: module.serve_bytes,
            METADATA_SIGNATURE: module.metadata})
        probabilities_model(module.model, module.multiclass).save(
            os.path.join(scratch, KERAS_FILE))
        with open(os.path.join(scratch, "labels.txt"), "w") as f:
            f.write("".join(f"{n}\n" for n in label_names))
        if thresholds is not None:
            save_thresholds(os.path.join(scratch, "thresholds.json"), thresholds, label_names,
                            objective=config.train.threshold_objective, weights=restored.weights,
                            metadata={"fbeta": config.loss.fbeta, "split": "val",
                                      "checkpoint": restored.path, "step": restored.step})


@contextlib.contextmanager
def atomic_directory(path: str):
    """A directory filled under a temporary name, then made readable by all and moved to path.

    A reader (a server, a user) sees the old directory or the whole new one,
    never a half-written one; a failure leaves the old one as it was.
    """
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
    try:
        yield tmp
        make_world_readable(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def probabilities_model(model, multiclass: bool):
    """What model.keras holds: pixels 0..255 -> probabilities, a plain Keras model.

    The training model ends in logits (principle 5); a file a user loads
    with `keras.models.load_model` is an edge, so it gives what
    serving_default gives: sigmoid per label, or softmax over the classes
    (per pixel for segmentation). The logits model is its layer "tapeworks"
    (`loaded.get_layer("tapeworks")`). Only built-in Keras layers and ops:
    loading needs no tapeworks import. Decisions are not in it: the
    thresholds are in thresholds.json next to it.
    """
    inputs = keras.Input(tuple(model.input_shape[1:]), dtype="float32", name="images")
    activation = keras.layers.Activation("softmax" if multiclass else "sigmoid",
                                         dtype="float32", name="probabilities")
    return keras.Model(inputs, activation(model(inputs)), name="tapeworks_probabilities")


def make_world_readable(root: str) -> None:
    """Directories 0755, files 0644 under root (mkdtemp makes 0700, mkstemp 0600).

    The export is read by a serving process that is usually another user.
    """
    os.chmod(root, 0o755)
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            os.chmod(os.path.join(directory, name), 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
