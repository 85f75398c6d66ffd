"""--mode=predict: a Planet-style submission for a folder (or list) of new images.

    python train_main.py --mode=predict --flagfile=runs/x/flags.txt \\
        --predict_input=test-jpg/ --predict_output=submission.csv
      -> submission.csv                 image_name,tags   (tags: space-separated label names)
         submission_probabilities.csv   image_name,<one column per label>
      segmentation: submission.csv (image_name,mask) and submission_masks/NAME.png
      (class ids as uint8, at --input_size)

--predict_input is a folder of .png/.jpg/.jpeg files (rows named by file
name without extension, sorted), a CSV with an image_name column (names
resolved in the CSV's folder or its images/ subfolder, with or without an
extension, as training reads labels.csv: a Planet test CSV works as it is),
a text file of image paths (one a line, relative to the file's folder), or
TFRecords in the engine's schema (a file, a glob, or a folder of
*.tfrecord*; rows named by image/name, else "file record i"). Rows keep
that order.

The model: by default the --model_dir checkpoint --mode=export would write
(--export_from, best by default; EMA weights when the run has them unless
--export_raw), with the thresholds export would serve, searched now on the
validation split on exactly those weights (engine/export.py's own
functions). Or --predict_model=DIR, an exported SavedModel: its
serving_default on pixels, and the label names and thresholds of its
metadata signature. A tag is a label whose probability >= its threshold
(0.5 when no threshold was searched: no validation examples); multiclass
too, so tags are the exported `decisions`. Probabilities are written with 6
decimals. The checkpoint route costs one validation pass per run (the
threshold search); predicting from an export skips it.

Images are decoded and resized by validation's own function
(engine/data/decode.py decode_for_eval), so a file gets the probabilities
validation would give it. Checkpoint predictions run through
engine/steps.py's make_eval_batch on every replica of --strategy (a
multi-worker flagfile predicts on this machine's devices); a SavedModel runs
on one device.

A bad image (not PNG/JPEG, does not decode, a missing file, an unreadable
record) stops the run with one line naming it; with --skip_bad_records it is
left out of the outputs and counted in the summary line. Outputs are written
to temporary files and moved into place at the end (0644), so a failed run
leaves any previous output as it was.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import sys
import tempfile
from typing import Callable, List, Optional

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from engine import distribute
from engine.config import Config, ConfigError
from engine.data import DataError, csv_source, tfrecord
from engine.data.decode import decode_for_eval, error_line
from engine.export import (METADATA_SIGNATURE, SIGNATURE, atomic_directory, open_run_data,
                           pick_checkpoint, restore_serving_model, serving_thresholds)
from engine.state import StateError
from engine.steps import make_eval_batch, make_segmentation_eval_batch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SKIP_HINT = " (--skip_bad_records leaves such images out)"
_DESCRIBED = 5  # bad images named in the summary line; the rest are counted


@dataclasses.dataclass
class Inputs:
    """The images to predict on, undecoded, in output order."""
    elements: tf.data.Dataset  # (image bytes, where, declared (height, width), name)
    count: int                 # elements, bad ones included
    description: str
    skipped: List[str] = dataclasses.field(default_factory=list)  # left out before reading
    skipped_count: int = 0


@dataclasses.dataclass
class Predictor:
    """A model as predict sees it: decoded pixels in, probabilities (or class ids) out."""
    run: Callable[[tf.Tensor], np.ndarray]  # images [B,S,S,3] -> probs [B,L] or ids [B,S,S]
    label_names: List[str]
    input_size: int
    segmentation: bool
    thresholds: Optional[np.ndarray]
    source: str          # which weights from where, for the summary line
    note: str = ""       # how the thresholds came about


def predict(config: Config) -> str:
    """Writes the outputs --predict_output names; returns the one summary line.

    Raises ConfigError for a missing flag, DataError naming a bad input,
    StateError for a model that cannot be loaded.
    """
    c = config.validated()
    output = _check_output(c.predict.output)
    if not c.predict.input:
        raise ConfigError("--mode=predict needs --predict_input (a folder of images, a CSV or "
                          "text list of images, or TFRecords)")
    inputs = open_inputs(c.predict.input, skip_bad=c.data.skip_bad_records)
    replicas = 1
    if c.predict.model:
        predictor = saved_model_predictor(c.predict.model)
    else:  # a multi-worker run's flagfile predicts on this machine's devices
        strategy = distribute.make_strategy(
            "auto" if c.train.strategy == "multi_worker" else c.train.strategy,
            c.train.num_virtual_cpus)
        predictor, replicas = checkpoint_predictor(c, strategy), strategy.num_replicas_in_sync
    bad, written = _predict_all(inputs, predictor, output, c)
    where = (f"masks -> {_masks_dir(output)}/ (class ids, uint8 PNG, "
             f"{predictor.input_size}x{predictor.input_size}), index -> {output}"
             if predictor.segmentation else
             f"tags -> {output}, probabilities -> {_probabilities_path(output)}")
    line = (f"predicted {written} images of {inputs.description} with {predictor.source}"
            f"{f' on {replicas} replicas' if replicas > 1 else ''}{predictor.note}: {where}")
    count = inputs.skipped_count + len(bad)  # bad: one line per image that did not load
    if count:
        line += f"; skipped {count} bad images (--skip_bad_records): {(inputs.skipped + bad)[0]}"
    return line


def _check_output(output: str) -> str:
    if not output:
        raise ConfigError("--mode=predict needs --predict_output, the CSV to write "
                          "(e.g. submission.csv)")
    path = os.path.abspath(os.path.expanduser(output))
    if os.path.isdir(path):
        raise ConfigError(f"--predict_output={output} is a directory; give a CSV file path")
    return path


def _probabilities_path(output: str) -> str:
    return os.path.splitext(output)[0] + "_probabilities.csv"


def _masks_dir(output: str) -> str:
    return os.path.splitext(output)[0] + "_masks"


# ----------------------------------------------------------------- inputs
def open_inputs(path: str, skip_bad: bool = False) -> Inputs:
    """--predict_input as undecoded elements: a folder, a CSV or text list, or TFRecords."""
    full = os.path.abspath(os.path.expanduser(path))
    if any(ch in path for ch in "*?["):
        files = sorted(tf.io.gfile.glob(full))
        if not files:
            raise DataError(f"--predict_input={path} matches no file")
        if all(_is_tfrecord(f) for f in files):
            return _tfrecord_inputs(files, path, skip_bad)
        return _path_inputs(files, [_stem(f) for f in files], f"--predict_input={path}")
    if not os.path.exists(full):
        raise DataError(f"--predict_input={path} does not exist")
    if os.path.isdir(full):
        names = sorted(n for n in os.listdir(full) if os.path.isfile(os.path.join(full, n)))
        images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        if images:
            return _path_inputs([os.path.join(full, n) for n in images],
                                [_stem(n) for n in images], f"folder {full}")
        records = [os.path.join(full, n) for n in names if _is_tfrecord(n)]
        if records:
            return _tfrecord_inputs(records, full, skip_bad)
        raise DataError(f"--predict_input={path} holds no .png/.jpg/.jpeg images and no "
                        f"*.tfrecord files")
    if _is_tfrecord(full):
        return _tfrecord_inputs([full], full, skip_bad)
    if full.lower().endswith(".csv"):
        return _csv_inputs(full, skip_bad)
    return _list_inputs(full, skip_bad)


def _is_tfrecord(name: str) -> bool:
    return ".tfrecord" in os.path.basename(name)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _path_inputs(paths, names, description, skipped=(), skipped_count=0) -> Inputs:
    if not paths:
        raise DataError(f"{description}: no image to predict on"
                        + (f" ({skipped[0]})" if skipped else ""))
    ds = tf.data.Dataset.from_tensor_slices((np.array(paths, str), np.array(names, str)))
    elements = ds.map(lambda p, n: (tf.io.read_file(p), p, tf.zeros([2], tf.int64), n))
    return Inputs(elements, len(paths), f"{description} ({len(paths)} listed)",
                  list(skipped), skipped_count or len(skipped))


def _csv_inputs(path: str, skip_bad: bool) -> Inputs:
    """A CSV with an image_name column, resolved like training's labels.csv (Planet layout)."""
    folder = csv_source.images_folder(os.path.dirname(path))
    files = set(os.listdir(folder))
    paths, names, skipped = [], [], []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        if "image_name" not in header:
            raise DataError(f"{path} line 1: no image_name column (a CSV list needs a header "
                            f"naming image_name; a text file lists one image path a line)")
        column = header.index("image_name")
        for row in reader:
            if not row or not "".join(row).strip():
                continue
            image = row[column].strip() if column < len(row) else ""
            found = csv_source.find_image(image, files)
            if found is None:
                message = f"{path} line {reader.line_num}: image {image!r} not found in {folder}"
                if not skip_bad:
                    raise DataError(message + _SKIP_HINT)
                skipped.append(message)
                continue
            paths.append(os.path.join(folder, found))
            names.append(image)
    return _path_inputs(paths, names, f"{path}", skipped)


def _list_inputs(path: str, skip_bad: bool) -> Inputs:
    """A text file of image paths, one a line, relative to the file's folder ('#' comments)."""
    base = os.path.dirname(path)
    paths, skipped = [], []
    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            image = os.path.join(base, os.path.expanduser(entry))
            if not os.path.isfile(image):
                message = f"{path} line {number}: {image} does not exist"
                if not skip_bad:
                    raise DataError(message + _SKIP_HINT)
                skipped.append(message)
                continue
            paths.append(image)
    return _path_inputs(paths, [_stem(p) for p in paths], path, skipped)


def _tfrecord_inputs(files, description: str, skip_bad: bool) -> Inputs:
    """Records in the engine's schema; a corrupt record ends what can be read of its file."""
    counts, unreadable, dropped = tfrecord.scan(files, 0, skip_bad=True)  # labels are not read
    if unreadable and not skip_bad:
        raise DataError(unreadable[0].split("; it and", 1)[0] + _SKIP_HINT)
    elements = tfrecord.file_records(files, counts).map(tfrecord.parse_image)
    return Inputs(elements, sum(counts), f"TFRecords {description} ({sum(counts)} records in "
                  f"{len(files)} files)", list(unreadable), dropped)


# ------------------------------------------------------------------ models
def checkpoint_predictor(c: Config, strategy) -> Predictor:
    """The weights --mode=export would write, on every replica, with export's thresholds."""
    model_dir = os.path.abspath(os.path.expanduser(c.train.model_dir))
    checkpoint = pick_checkpoint(model_dir, c.train.export_from)
    data = open_run_data(c)
    with strategy.scope():
        model, restored = restore_serving_model(c, data.num_labels, checkpoint)
    thresholds, note = serving_thresholds(model, data, c)
    seg = c.model.task == "segmentation"
    size, labels = c.model.input_size, data.num_labels

    def no_loss(targets, logits):  # make_eval_batch's loss slot: predict has no labels
        return tf.zeros(tf.shape(logits)[:1])

    common = dict(model=model, loss_fn=no_loss, strategy=strategy, input_size=size,
                  local_replicas=distribute.local_replica_count(strategy))
    if seg:
        batch = make_segmentation_eval_batch(num_classes=labels, **common)
        run = lambda images: batch(images, tf.zeros(tf.shape(images)[:3], tf.int32))[0].numpy()
    else:
        batch = make_eval_batch(num_outputs=labels, multiclass=c.model.task == "multiclass",
                                **common)
        run = lambda images: batch(images, tf.zeros([tf.shape(images)[0], labels]))[0].numpy()
    source = (f"{'EMA' if restored.weights == 'ema' else 'raw'} weights of step {restored.step} "
              f"from {restored.path} ({restored.origin}){restored.notes}")
    return Predictor(run, list(data.label_names), size, seg, thresholds, source,
                     note if thresholds is not None or seg else note + "; tags at 0.5")


def saved_model_predictor(path: str) -> Predictor:
    """An exported SavedModel: serving_default on pixels; labels and thresholds from metadata."""
    full = os.path.abspath(os.path.expanduser(path))
    if not tf.saved_model.contains_saved_model(full):
        raise StateError(f"--predict_model={path} is not a SavedModel directory (give an "
                         f"export dir such as runs/x/export/N)")
    loaded = tf.saved_model.load(full)
    missing = [s for s in (SIGNATURE, METADATA_SIGNATURE) if s not in loaded.signatures]
    if missing:
        raise StateError(f"--predict_model={path} has no {missing[0]} signature; export it "
                         f"with --mode=export")
    serve = loaded.signatures[SIGNATURE]
    meta = {k: v.numpy() for k, v in loaded.signatures[METADATA_SIGNATURE]().items()}
    size = int(serve.structured_input_signature[1]["images"].shape[1])
    seg = len(serve.structured_outputs["probabilities"].shape) == 4
    names = [n.decode() for n in meta["label_names"]]
    thresholds = meta.get("thresholds")

    def run(images):
        probs = serve(images=images)["probabilities"]
        return (tf.argmax(probs, axis=-1, output_type=tf.int32) if seg else probs).numpy()

    weights = "EMA" if meta["weights"] == b"ema" else "raw"
    note = ("" if seg else "; tags at 0.5 (no thresholds in it)" if thresholds is None else
            f"; its thresholds (--threshold_objective={meta['threshold_objective'].decode()})")
    return Predictor(run, names, size, seg, thresholds,
                     f"{weights} weights of step {int(meta['step'])} from SavedModel {full}", note)


# --------------------------------------------------------------- the pass
def _decoded_batches(inputs: Inputs, input_size: int, batch_size: int):
    """(indices, names, images) batches; images that fail to load are left out (ignore_errors).

    The caller finds them as gaps in the indices, so one bad file neither
    stops the pipeline nor goes unnoticed.
    """
    def load(index, elem):
        image_bytes, where, declared, name = elem
        return index, name, decode_for_eval(image_bytes, input_size, where, declared)

    ds = inputs.elements.enumerate().map(load, num_parallel_calls=tf.data.AUTOTUNE,
                                         deterministic=True).ignore_errors()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _describe(inputs: Inputs, index: int, input_size: int) -> str:
    """One line on why element `index` does not load (read again, eagerly)."""
    for image_bytes, where, declared, _ in inputs.elements.skip(index).take(1):
        try:
            decode_for_eval(image_bytes, input_size, where, declared)
        except tf.errors.OpError as e:
            return error_line(e, where.numpy().decode())
        return f"{where.numpy().decode()}: loads now (changed meanwhile?)"
    return f"image {index}: cannot be read"


def _predict_all(inputs: Inputs, predictor: Predictor, output: str, c: Config):
    """Runs every batch and writes the outputs -> (lines about bad images, images written)."""
    bad, expected, written = [], 0, 0

    def gaps(upto):
        for index in range(expected, upto):
            if not c.data.skip_bad_records:
                raise DataError(_describe(inputs, index, predictor.input_size) + _SKIP_HINT)
            if len(bad) < _DESCRIBED:
                bad.append(_describe(inputs, index, predictor.input_size))
            else:
                bad.append(f"... image {index}")

    with _writers(output, predictor) as write, tqdm(
            total=inputs.count, unit="img", desc="predict", disable=not c.train.progress,
            file=sys.stderr) as bar:
        for indices, names, images in _decoded_batches(inputs, predictor.input_size,
                                                       c.train.batch_size):
            indices = indices.numpy()
            for index in indices:  # a bad image leaves a gap, here or before the batch
                gaps(int(index))
                expected = int(index) + 1
            write([n.decode() for n in names.numpy()], predictor.run(images))
            written += len(indices)
            bar.update(len(indices))
        gaps(inputs.count)
        if not written:
            raise DataError(f"{inputs.description}: no image loads"
                            + (f" ({(inputs.skipped + bad)[0]})" if inputs.skipped + bad else ""))
    return bad, written


# ----------------------------------------------------------------- outputs
@contextlib.contextmanager
def _writers(output: str, predictor: Predictor):
    """A write(names, batch outputs) function over the output files, moved in place at the end."""
    os.makedirs(os.path.dirname(output), exist_ok=True)
    names = predictor.label_names
    with contextlib.ExitStack() as stack:
        rows = csv.writer(stack.enter_context(_atomic_file(output)), lineterminator="\n")
        if predictor.segmentation:
            masks = stack.enter_context(atomic_directory(_masks_dir(output)))
            folder = os.path.basename(_masks_dir(output))
            rows.writerow(["image_name", "mask"])
            yield lambda images, ids: _write_masks(rows, masks, folder, images, ids)  # noqa: E731
            return
        probs_rows = csv.writer(stack.enter_context(_atomic_file(_probabilities_path(output))),
                                lineterminator="\n")
        rows.writerow(["image_name", "tags"])
        probs_rows.writerow(["image_name", *names])
        thresholds = (np.full(len(names), 0.5, np.float32) if predictor.thresholds is None
                      else np.asarray(predictor.thresholds, np.float32))

        def write(images, probs):
            for image, p in zip(images, probs):
                rows.writerow([image, " ".join(n for n, on in zip(names, p >= thresholds) if on)])
                probs_rows.writerow([image, *(f"{v:.6f}" for v in p)])

        yield write


def _write_masks(rows, masks: str, folder: str, images, ids) -> None:
    for image, mask in zip(images, ids):
        file = image.replace("/", "_").replace(os.sep, "_") + ".png"
        with open(os.path.join(masks, file), "wb") as f:
            f.write(tf.io.encode_png(mask.astype(np.uint8)[..., None]).numpy())
        rows.writerow([image, f"{folder}/{file}"])


@contextlib.contextmanager
def _atomic_file(path: str):
    """A text file written under a temporary name, then made 0644 and renamed to path."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            yield f
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
