"""TFRecord schema, writer and the checks made when records are opened or read.

Record schema (one tf.train.Example per image; the embedded dataset uses it
too, so there is one reader for everything):

    image/encoded  bytes        the image file, PNG or JPEG (any size, any channel
                                count; decoded to RGB)
    image/labels   int64 list   indices of the POSITIVE labels, varlen, may be
                                empty; index i names line i of labels.txt
    image/name     bytes        optional, for messages and predictions
    image/label_vector  float list  optional instead of image/labels: the dense
                                multi-hot (or soft) label vector, one value in
                                [0, 1] per line of labels.txt
    image/height, image/width   int64, optional: when given, the decoded image
                                must have that size (many writers record it)

Bad records fail naming file and record: a label index outside labels.txt or
a label vector of the wrong width when the files are opened (``scan``), a
record that cannot be read (corrupt or cut short) likewise, and an image that
does not decode or is not of its declared size when it is read. With
--skip_bad_records the source finds them all when it is opened and leaves
them out instead (source.py); a corrupt record ends what can be read of its
file, so the records after it are left out too.

Files: ``train-*.tfrecord*`` and ``val-*.tfrecord*`` (``validation-*`` is also
accepted) next to ``labels.txt``; names ending in ``.gz`` are read as GZIP.
"""

import gzip
import os
import re
import struct
import zlib
from typing import Optional

import numpy as np
import tensorflow as tf

from engine.data.errors import DataError

ENCODED = "image/encoded"
LABELS = "image/labels"
NAME = "image/name"
VECTOR = "image/label_vector"
HEIGHT = "image/height"
WIDTH = "image/width"

_FEATURES = {
    ENCODED: tf.io.FixedLenFeature([], tf.string),
    LABELS: tf.io.VarLenFeature(tf.int64),
    NAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
    VECTOR: tf.io.VarLenFeature(tf.float32),
    HEIGHT: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    WIDTH: tf.io.FixedLenFeature([], tf.int64, default_value=0),
}


def bytes_feature(v):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))


def write_tfrecords(path_prefix, images_uint8, label_index_lists, names=None, num_shards=1):
    """Write examples in the schema above; return the list of file paths.

    ``images_uint8`` is a [N,H,W,C] uint8 array or a list of HxWxC arrays (PNG
    encoded here) or of already-encoded bytes (stored as they are, which lets
    tests write JPEGs or corrupt data). Shards are contiguous slices named
    ``{path_prefix}-00000-of-0000N.tfrecord``, so reading the files in sorted
    order gives back the input order.
    """
    n = len(images_uint8)
    if len(label_index_lists) != n or (names is not None and len(names) != n):
        raise ValueError("images, label_index_lists and names must have the same length")

    def features(i):
        labels = [int(v) for v in label_index_lists[i]]
        return {ENCODED: bytes_feature(png_bytes(images_uint8[i])),
                LABELS: tf.train.Feature(int64_list=tf.train.Int64List(value=labels))}

    return write_sharded(path_prefix, n, features, names=names, num_shards=num_shards)


def png_bytes(image) -> bytes:
    """An image array as PNG bytes; bytes (already encoded, or deliberately broken) as they are."""
    if isinstance(image, bytes):
        return image
    return tf.io.encode_png(np.asarray(image, np.uint8)).numpy()


def write_sharded(path_prefix, n, features, *, names=None, num_shards=1):
    """Writes examples 0..n-1 (features(i) -> {key: tf.train.Feature}, plus NAME when names
    are given) into num_shards contiguous files; returns their paths.

    Serialized deterministically (map order), so the same input gives byte-identical files.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
    paths = []
    for shard, idx in enumerate(np.array_split(np.arange(n), max(1, num_shards))):
        path = f"{path_prefix}-{shard:05d}-of-{num_shards:05d}.tfrecord"
        with tf.io.TFRecordWriter(path) as w:
            for i in idx:
                feats = features(i)
                if names is not None:
                    feats[NAME] = bytes_feature(str(names[i]).encode())
                example = tf.train.Example(features=tf.train.Features(feature=feats))
                w.write(example.SerializeToString(deterministic=True))
        paths.append(path)
    return paths


def compression(path):
    return "GZIP" if path.endswith(".gz") else ""


def scan(files, num_labels, skip_bad=False):
    """Count records and positives per label, checking every label index and vector.

    Done once when the data is opened so that counts and prevalence are exact
    and a bad label is reported as a DataError naming file and record before
    any training starts. Reads bytes but decodes no image.

    skip_bad=False returns (count, positives). skip_bad=True raises nothing
    for bad records and returns (readable records per file, [messages about
    unreadable records], how many records those messages leave out): label
    problems are then left to the source's check of every record, which also
    decodes the images.
    """
    count, positives = 0, np.zeros(num_labels, np.float64)
    readable, unreadable, dropped = [], [], 0
    spec = {ENCODED: _FEATURES[ENCODED], LABELS: _FEATURES[LABELS], VECTOR: _FEATURES[VECTOR]}
    for f in files:
        ds = tf.data.TFRecordDataset(f, compression_type=compression(f)).batch(1024)
        ds = ds.map(lambda r: tf.io.parse_example(r, spec))
        start = 0
        try:
            for ex in ds:
                size = int(ex[LABELS].dense_shape[0])
                if not skip_bad:
                    positives += _check_labels(f, start, ex, num_labels)
                start += size
        except tf.errors.OpError as e:
            index = _readable_records(f)
            reason = re.sub(r"^\{\{[^}]*\}\}\s*", "", e.message.splitlines()[0])[:120]
            message = f"{f} record {index}: cannot be read (corrupt or cut short: {reason})"
            if not skip_bad:
                raise DataError(message) from None
            total = records_in_file(f)
            if total is None or total <= index:
                unreadable.append(message + "; it and the rest of the file (a number of records "
                                  "that cannot be told: the framing is damaged) are left out")
                dropped += 1
            else:
                unreadable.append(message + f"; it and the {total - index - 1} records after it "
                                  f"are left out")
                dropped += total - index
            start = index
        count += start
        readable.append(start)
    if skip_bad:
        return readable, unreadable, dropped
    return count, positives


def records_in_file(f) -> Optional[int]:
    """How many records a TFRecord file frames, reading only the length fields.

    A record whose bytes fail their checksum cannot be read, and tf.data
    stops the whole file there; the framing (8-byte length, 4-byte length
    CRC, data, 4-byte data CRC) still says how many records follow, so
    --skip_bad_records can count what it leaves out. None when the framing
    itself is damaged (lengths that do not end exactly at the end of file).
    """
    kind = compression(f)
    with tf.io.gfile.GFile(f, "rb") as fh:
        data = fh.read()
    try:
        if kind == "GZIP":
            data = gzip.decompress(data)
        elif kind == "ZLIB":
            data = zlib.decompress(data)
    except (OSError, zlib.error, EOFError):
        return None
    n, offset = 0, 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        offset += 12 + length + 4
        n += 1
    return n if offset == len(data) else None


def _check_labels(f, start, ex, num_labels):
    """Positives per label of one parsed batch; a DataError naming file and record if bad.

    A record with a label vector counts by its vector, others by their indices.
    """
    sp, vec = ex[LABELS], ex[VECTOR]
    size = int(sp.dense_shape[0])
    rows, vals = sp.indices[:, 0].numpy(), sp.values.numpy()
    bad = np.flatnonzero((vals < 0) | (vals >= num_labels))
    if bad.size:
        j = bad[0]
        raise DataError(f"{f} record {start + rows[j]}: label index {vals[j]} is outside "
                        f"[0, {num_labels}) of labels.txt")
    vrows, values = vec.indices[:, 0].numpy(), vec.values.numpy()
    widths = np.bincount(vrows, minlength=size)
    wrong = np.flatnonzero((widths != 0) & (widths != num_labels))
    if wrong.size:
        r = wrong[0]
        raise DataError(f"{f} record {start + r}: label vector has {widths[r]} values; "
                        f"labels.txt names {num_labels} labels")
    out = ~np.isfinite(values) | (values < 0) | (values > 1)
    if out.any():
        j = np.flatnonzero(out)[0]
        raise DataError(f"{f} record {start + vrows[j]}: label vector value {values[j]} is "
                        f"not in [0, 1]")
    by_index = widths[rows] == 0
    pairs = np.unique(rows[by_index] * num_labels + vals[by_index])
    positives = np.bincount(pairs % num_labels, minlength=num_labels).astype(np.float64)
    if values.size:
        positives += values.reshape(-1, num_labels).sum(0)
    return positives


def _readable_records(f):
    """How many records of file f can be read before the first unreadable one."""
    n = 0
    try:
        for _ in tf.data.TFRecordDataset(f, compression_type=compression(f)):
            n += 1
    except tf.errors.OpError:
        pass
    return n


def file_records(files, counts=None):
    """Dataset of (serialized, filename, index in file), files in the given order.

    counts: how many records to read from each file (None: all), so a file
    whose tail is unreadable can be read up to it.
    """
    counts = [-1] * len(files) if counts is None else [int(c) for c in counts]
    ds = tf.data.Dataset.from_tensor_slices(
        (list(files), [compression(f) for f in files], tf.constant(counts, tf.int64)))
    return ds.flat_map(lambda f, c, n: tf.data.TFRecordDataset(f, compression_type=c).take(n)
                       .enumerate().map(lambda i, r: (r, f, i)))


def parse(serialized, filename, index, num_labels, with_size=False):
    """(image bytes, multi-hot float32 labels, 'file record i') with checked labels.

    with_size=True adds the declared (height, width), (0, 0) when not given.
    """
    ex = tf.io.parse_single_example(serialized, _FEATURES)
    labels = ex[LABELS].values
    where = tf.strings.join([filename, " record ", tf.strings.as_string(index)])
    ok = tf.reduce_all((labels >= 0) & (labels < num_labels))
    check = tf.debugging.Assert(ok, [tf.strings.join([
        where, ": label index out of range [0, ", str(num_labels), ") of labels.txt: ",
        tf.strings.reduce_join(tf.strings.as_string(labels), separator=" ")])])
    vector = ex[VECTOR].values
    width = tf.size(vector)
    width_ok = tf.logical_or(tf.equal(width, 0), tf.equal(width, num_labels))
    check_width = tf.debugging.Assert(width_ok, [tf.strings.join([
        where, ": label vector has ", tf.strings.as_string(width), " values; labels.txt names ",
        str(num_labels), " labels"])])
    values_ok = tf.reduce_all(tf.math.is_finite(vector) & (vector >= 0.0) & (vector <= 1.0))
    check_values = tf.debugging.Assert(values_ok, [tf.strings.join([
        where, ": label vector values must be in [0, 1]"])])
    with tf.control_dependencies([check, check_width, check_values]):
        multi_hot = tf.cond(
            width > 0, lambda: tf.reshape(vector, [num_labels]),
            lambda: tf.minimum(tf.reduce_sum(tf.one_hot(labels, num_labels, dtype=tf.float32), 0), 1.0))
    if with_size:
        return ex[ENCODED], multi_hot, where, tf.stack([ex[HEIGHT], ex[WIDTH]])
    return ex[ENCODED], multi_hot, where


def parse_image(serialized, filename, index):
    """(image bytes, 'file record i', declared (height, width), name) of one record, labels unread.

    For --mode=predict: records to predict on may carry no labels, or labels
    of another labels.txt; image/name (when given) names the row of the
    output, else the 'file record i' string does.
    """
    spec = {k: _FEATURES[k] for k in (ENCODED, NAME, HEIGHT, WIDTH)}
    ex = tf.io.parse_single_example(serialized, spec)
    where = tf.strings.join([filename, " record ", tf.strings.as_string(index)])
    name = tf.where(tf.equal(ex[NAME], ""), where, ex[NAME])
    return ex[ENCODED], where, tf.stack([ex[HEIGHT], ex[WIDTH]]), name


def read_labels_txt(path):
    """labels.txt: one unique label name per line (TFRecord and segmentation data)."""
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; it must list one label name per line")
    with open(path, encoding="utf-8") as fh:
        names = [line.strip() for line in fh if line.strip()]
    if not names:
        raise DataError(f"{path} is empty; it must list one label name per line")
    if len(set(names)) != len(names):
        raise DataError(f"{path} lists a label name twice")
    return names
