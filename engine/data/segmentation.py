"""Segmentation data: the embedded set, TFRecords with masks, images/ + masks/.

Every source yields (images [B,S,S,3] float32 0..255, masks [B,S,S] int32
class ids) through the same pipeline as classification (source.py: a pure
function of seed and epoch, exact resume); only decoding differs: the mask
is resized with nearest neighbour and flipped together with its image.

Record schema (TFRecords, the embedded set uses it too):

    image/encoded  bytes   the image file, PNG or JPEG (decoded to RGB)
    mask/encoded   bytes   a single-channel PNG whose pixel values are class
                           ids; id i names line i of labels.txt (0: background)
    image/name     bytes   optional, for messages

User folders: ``data_dir/images/NAME.ext`` with ``data_dir/masks/NAME.png``
(or the same file name), optional ``data_dir/labels.txt`` with the class
names (else class_0.. up to the largest id seen); an image goes to validation
when a stable hash of its name falls below val_fraction (as for the CSV).

Every mask is read once when the data is opened: that counts the class
pixel shares (the bar a majority-class model sets) and names any mask with
an id outside labels.txt, or with several channels, before training starts.
The embedded set keeps its counts in meta.json instead.

The embedded set: 64x64 images of a textured background with discs, squares
and triangles drawn on it, each class its own jittered colour and size; about
70% of pixels are background and the three shape classes take decreasing
shares (see CLASSES), so a model that predicts "background" everywhere scores
a mean IoU of about 0.7 / 4. The generator seed is fixed; the stored copy is
``cache_dir/embedded_seg_v1/``; bump the version whenever the generator changes.
"""

import json
import os

import numpy as np
import tensorflow as tf

from engine.data import csv_source, embedded, tfrecord
from engine.data.errors import DataError
from engine.data.decode import decode_for_eval
from engine.data.source import AUTOTUNE, DataSource, flip_rows

DIRNAME = "embedded_seg_v1"
GENERATOR_SEED = 20240613
SIZE = 64
NUM_TRAIN, NUM_VAL = 1024, 256
TRAIN_SHARDS, VAL_SHARDS = 2, 1
CLASSES = [  # (name, approximate share of pixels)
    ("background", 0.72), ("disc", 0.155), ("square", 0.085), ("triangle", 0.04)]
CLASS_NAMES = [n for n, _ in CLASSES]

MASK = "mask/encoded"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_FEATURES = {
    tfrecord.ENCODED: tf.io.FixedLenFeature([], tf.string),
    MASK: tf.io.FixedLenFeature([], tf.string),
    tfrecord.NAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
}
_COLOURS = {1: (210, 50, 40), 2: (40, 70, 210), 3: (235, 215, 40)}


# ------------------------------------------------------------------ drawing
def _shape_mask(cls, cy, cx, size):
    y, x = np.mgrid[:SIZE, :SIZE] + 0.5
    if cls == 1:   # disc of radius size
        return (y - cy) ** 2 + (x - cx) ** 2 <= size * size
    if cls == 2:   # axis-aligned square of half-side size
        return (np.abs(y - cy) <= size) & (np.abs(x - cx) <= size)
    if cls == 3:   # upward triangle of half-width size
        top = cy - size
        return (y >= top) & (y <= cy + size) & (np.abs(x - cx) <= (y - top) / 2.0)
    raise ValueError(cls)


def _draw(rng):
    """One image (float32 [64,64,3]) and its mask (uint8 [64,64])."""
    img = np.empty((SIZE, SIZE, 3), np.float32)
    base = rng.uniform([90, 90, 80], [160, 150, 140])
    ramp = np.linspace(-1, 1, SIZE)[:, None, None] * rng.uniform(-25, 25, 3)
    img[:] = base + ramp + rng.normal(0, 10, (SIZE, SIZE, 1))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    # big shapes first, so the small ones drawn later keep their pixels
    plan = [(1, rng.integers(1, 4), (9.5, 14.0)), (2, rng.integers(0, 4), (6.5, 9.5)),
            (3, rng.integers(0, 5), (5.0, 8.0))]
    for cls, count, (lo, hi) in plan:
        for _ in range(int(count)):
            size = rng.uniform(lo, hi)
            cy, cx = rng.uniform(size, SIZE - size, 2)
            m = _shape_mask(cls, cy, cx, size)
            img[m] = np.array(_COLOURS[cls]) + rng.uniform(-30, 30, 3)
            mask[m] = cls
    img += rng.normal(0, 8, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def generate(n, rng):
    """(uint8 images [n,64,64,3], uint8 masks [n,64,64])."""
    pairs = [_draw(rng) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def write_seg_tfrecords(path_prefix, images, masks, names=None, num_shards=1):
    """Writes (image, mask) pairs in the schema above; returns the file paths.

    images: uint8 [N,H,W,3] (PNG-encoded here) or encoded bytes; masks: uint8
    [N,H,W] or [N,H,W,1] class ids, or encoded bytes.
    """
    n = len(images)
    if len(masks) != n or (names is not None and len(names) != n):
        raise ValueError("images, masks and names must have the same length")

    def features(i):
        mask = masks[i]
        if not isinstance(mask, bytes):
            mask = np.asarray(mask, np.uint8)
            mask = mask[..., None] if mask.ndim == 2 else mask
        return {tfrecord.ENCODED: tfrecord.bytes_feature(tfrecord.png_bytes(images[i])),
                MASK: tfrecord.bytes_feature(tfrecord.png_bytes(mask))}

    return tfrecord.write_sharded(path_prefix, n, features, names=names, num_shards=num_shards)


def ensure_embedded(cache_dir):
    """The embedded segmentation set's directory, created atomically on first use."""
    def fill(directory):
        rng = np.random.default_rng(GENERATOR_SEED)
        meta = {"version": 1, "generator_seed": GENERATOR_SEED, "image_size": SIZE,
                "class_names": CLASS_NAMES}
        for split, n, shards in (("train", NUM_TRAIN, TRAIN_SHARDS), ("val", NUM_VAL, VAL_SHARDS)):
            images, masks = generate(n, rng)
            write_seg_tfrecords(os.path.join(directory, split), images, masks,
                                names=[f"{split}_{i:05d}" for i in range(n)], num_shards=shards)
            counts = np.bincount(masks.reshape(-1), minlength=len(CLASSES))
            meta[f"num_{split}"] = n
            meta[f"{split}_pixel_counts"] = [int(c) for c in counts]
            meta[f"{split}_class_share"] = [round(float(c) / counts.sum(), 4) for c in counts]
        return meta

    return embedded.build_once(cache_dir, DIRNAME, fill, CLASS_NAMES)


# ------------------------------------------------------------------ reading
def _decode_mask(mask_bytes, where, size, num_classes):
    """int32 [size,size] class ids; a bad mask fails naming its record."""
    head = tf.strings.substr(mask_bytes, 0, 4)
    check = tf.debugging.Assert(tf.equal(head, b"\x89PNG"),
                                [tf.strings.join([where, ": mask is not a PNG"])])
    with tf.control_dependencies([check]):
        mask = tf.io.decode_png(mask_bytes, channels=1)
    ok = tf.reduce_max(tf.cast(mask, tf.int32)) < num_classes
    check = tf.debugging.Assert(ok, [tf.strings.join([
        where, ": mask holds a class id >= ", str(num_classes), ", the number of classes"])])
    with tf.control_dependencies([check]):
        mask = tf.image.resize(mask, [size, size], method="nearest")
    return tf.cast(mask[..., 0], tf.int32)


class _SegSource(DataSource):
    """A DataSource whose labels are masks: int32 [S,S] class ids per image."""

    task = "segmentation"

    def _pair(self, *elem):
        """(image bytes, mask bytes, 'where' string) of one element."""
        raise NotImplementedError

    def _decode_example(self, elem, input_size):
        image_bytes, mask_bytes, where = self._pair(*elem)
        image = decode_for_eval(image_bytes, input_size, where)
        return image, _decode_mask(mask_bytes, where, input_size, self.num_labels)

    @staticmethod
    def _flip(image, mask, flip):
        return tf.where(flip, tf.reverse(image, [1]), image), tf.where(flip, tf.reverse(mask, [1]), mask)

    @staticmethod
    def _flip_batch(images, masks, flips):
        return flip_rows(images, flips), flip_rows(masks, flips)

    def decoded_example_bytes(self, input_size):
        """Float32 pixels and the int32 mask (a third more than the image alone)."""
        return input_size * input_size * (3 * 4 + 4)

    @property
    def majority_class(self):
        return int(np.argmax(self.label_prevalence))


class _SegTFRecordSource(_SegSource):
    def __init__(self, files, **kw):
        super().__init__(**kw)
        self.files = files  # split -> the TFRecord files read, in order

    def _elements(self, split):
        return tfrecord.file_records(self.files[split])

    def _pair(self, serialized, filename, index):
        ex = tf.io.parse_single_example(serialized, _FEATURES)
        where = tf.strings.join([filename, " record ", tf.strings.as_string(index)])
        return ex[tfrecord.ENCODED], ex[MASK], where


class _SegFolderSource(_SegSource):
    def __init__(self, pairs, **kw):
        super().__init__(**kw)
        self._pairs = pairs  # split -> (image paths, mask paths)

    def _elements(self, split):
        images, masks = self._pairs[split]
        return tf.data.Dataset.from_tensor_slices((np.array(images, str), np.array(masks, str)))

    def _pair(self, image_path, mask_path):
        return tf.io.read_file(image_path), tf.io.read_file(mask_path), mask_path


def _count_pixels(ds, what):
    """(per-id pixel counts [256], number of masks) over a dataset of (mask bytes, where).

    Checks each mask decodes and has one channel.
    """

    def count(mask_bytes, where):
        mask = tf.io.decode_image(mask_bytes, channels=0, expand_animations=False)
        ids = tf.reshape(tf.cast(mask, tf.int32), [-1])
        return (tf.math.bincount(ids, minlength=256, maxlength=256, dtype=tf.int64),
                tf.shape(mask)[-1], where)

    total, n = np.zeros(256, np.int64), 0
    try:
        for counts, channels, where in ds.map(count, num_parallel_calls=AUTOTUNE,
                                              deterministic=True).prefetch(AUTOTUNE):
            if int(channels) != 1:
                raise DataError(f"{where.numpy().decode()}: mask has {int(channels)} channels; "
                                f"masks must be single-channel PNGs of class ids")
            total += counts.numpy()
            n += 1
    except tf.errors.OpError as e:
        raise DataError(f"{what}: cannot read a mask ({e.message.splitlines()[0][:200]})") from None
    return total, n


def _check_ids(counts, names, what):
    used = np.flatnonzero(counts)
    if used.size and used.max() >= len(names):
        raise DataError(f"{what}: masks hold class id {int(used.max())} but there are "
                        f"{len(names)} classes ({', '.join(names)})")


def _shares(counts, num_classes):
    counts = counts[:num_classes].astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def _open_seg_tfrecords(data_dir, source, seed, meta=None):
    def glob(*patterns):
        return sorted({f for p in patterns for f in tf.io.gfile.glob(os.path.join(data_dir, p))})

    files = {"train": glob("train-*.tfrecord*"),
             "val": glob("val-*.tfrecord*", "validation-*.tfrecord*")}
    if not files["val"]:
        raise DataError(f"--data_dir={data_dir} has train-*.tfrecord files but no "
                        f"val-*.tfrecord files")
    names = tfrecord.read_labels_txt(os.path.join(data_dir, "labels.txt"))
    if len(names) < 2:
        raise DataError(f"{data_dir}/labels.txt: segmentation needs at least 2 classes "
                        f"(line 1 is the background)")
    counts = {}
    for split in ("train", "val"):
        if meta is not None:
            counts[split] = (meta[f"num_{split}"], np.asarray(meta[f"{split}_pixel_counts"]))
            continue
        records = tfrecord.file_records(files[split]).map(
            lambda r, f, i: (tf.io.parse_single_example(r, _FEATURES)[MASK],
                             tf.strings.join([f, " record ", tf.strings.as_string(i)])))
        pixels, n = _count_pixels(records, f"--data_dir={data_dir} {split}")
        _check_ids(pixels, names, f"--data_dir={data_dir} {split}")
        counts[split] = (n, pixels)
    num_train, num_val = counts["train"][0], counts["val"][0]
    if num_train == 0:
        raise DataError(f"--data_dir={data_dir}: the train-*.tfrecord files hold no records")
    desc = (f"{source} segmentation {data_dir} ({num_train} train / {num_val} val, "
            f"{len(names)} classes)")
    return _SegTFRecordSource(files, label_names=names, source=source, description=desc,
                              num_train=num_train, num_val=num_val,
                              label_prevalence=_shares(counts["train"][1], len(names)), seed=seed)


def _find_mask(masks_dir, mask_files, image_name):
    stem = os.path.splitext(image_name)[0]
    for candidate in (stem + ".png", image_name):
        if candidate in mask_files:
            return os.path.join(masks_dir, candidate)
    return None


def _open_seg_folder(data_dir, seed, val_fraction):
    images_dir, masks_dir = os.path.join(data_dir, "images"), os.path.join(data_dir, "masks")
    if not os.path.isdir(masks_dir):
        raise DataError(f"--data_dir={data_dir} has images/ but no masks/ folder "
                        f"(segmentation wants images/NAME and masks/NAME.png)")
    mask_files = set(os.listdir(masks_dir))
    pairs = {"train": ([], []), "val": ([], [])}
    for name in sorted(os.listdir(images_dir)):
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        mask = _find_mask(masks_dir, mask_files, name)
        if mask is None:
            raise DataError(f"{os.path.join(images_dir, name)} has no mask: expected "
                            f"{os.path.join(masks_dir, os.path.splitext(name)[0] + '.png')}")
        split = "val" if csv_source.in_val(name, val_fraction) else "train"
        pairs[split][0].append(os.path.join(images_dir, name))
        pairs[split][1].append(mask)
    if not pairs["train"][0]:
        raise DataError(f"--data_dir={data_dir}: no training images (.png/.jpg) in images/ "
                        f"after the validation split")
    if not 0.0 < val_fraction < 1.0 or not pairs["val"][0]:
        raise DataError(f"--data_dir={data_dir}: no validation images (hash split of "
                        f"{val_fraction:g}); add images")
    counts = {}
    for split, (_, masks) in pairs.items():
        ds = tf.data.Dataset.from_tensor_slices(np.array(masks, str)).map(
            lambda p: (tf.io.read_file(p), p))
        counts[split] = _count_pixels(ds, f"--data_dir={data_dir}")[0]
    labels_txt = os.path.join(data_dir, "labels.txt")
    if os.path.isfile(labels_txt):
        names = tfrecord.read_labels_txt(labels_txt)
    else:
        largest = int(np.flatnonzero(counts["train"] + counts["val"]).max())
        names = [f"class_{i}" for i in range(max(largest + 1, 2))]
    for split in pairs:
        _check_ids(counts[split], names, f"--data_dir={data_dir} masks ({split})")
    num_train, num_val = len(pairs["train"][0]), len(pairs["val"][0])
    desc = (f"folder segmentation {data_dir} ({num_train} train / {num_val} val, "
            f"{len(names)} classes, hash split {val_fraction:g})")
    return _SegFolderSource(pairs, label_names=names, source="folder", description=desc,
                            num_train=num_train, num_val=num_val,
                            label_prevalence=_shares(counts["train"], len(names)), seed=seed)


def open_segmentation_data(data_dir, cache_dir, seed=0, val_fraction=0.1):
    """The embedded segmentation set (no data_dir), seg TFRecords, or images/ + masks/."""
    if not data_dir:
        path = ensure_embedded(os.path.expanduser(cache_dir))
        with open(os.path.join(path, "meta.json")) as fh:
            meta = json.load(fh)
        return _open_seg_tfrecords(path, "embedded", seed, meta=meta)
    data_dir = os.path.expanduser(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"--data_dir={data_dir} does not exist or is not a directory")
    if tf.io.gfile.glob(os.path.join(data_dir, "train-*.tfrecord*")):
        return _open_seg_tfrecords(data_dir, "tfrecord", seed)
    if os.path.isdir(os.path.join(data_dir, "images")):
        return _open_seg_folder(data_dir, seed, val_fraction)
    raise DataError(f"--data_dir={data_dir} has neither train-*.tfrecord files nor an images/ "
                    f"folder (with masks/) for --task=segmentation")
