"""open_data and DataSource: the one object the trainer asks for datasets.

The training pipeline is a pure function of (seed, epoch), which is what makes
exact resume possible:

    cheap undecoded elements in a fixed order      (records, or (path, labels))
    -> permute the WHOLE epoch by a stateless key   (seed, epoch)
    -> enumerate                                    (index within the epoch)
    -> keep every num_shards-th element             (multi-worker)
    -> skip skip_batches * batch elements           (resume: nothing skipped is decoded)
    -> decode, resize, flip where epoch_flips(seed, epoch)[index] says
    -> batch(drop_remainder) -> prefetch

Bad records: without --skip_bad_records a bad record stops the run with a
one-line error naming file and record (a label problem when the data is
opened; an image that does not decode or is not of its declared size when it
is read: ``explain_error`` turns TensorFlow's error into that line). With it,
``skip_bad_records`` loads every record once when the data is opened (decode
included), and the pipelines leave out the ones that fail, before the epoch
permutation, so counts, order and exact resume stay what they are for a
clean data set; ``skipped_records`` counts them for the epoch report.

Decoded once, when it fits: if the decoded training split (float32 pixels at
the run's input size) takes at most ``decoded_cache_bytes`` (--decoded_cache_mb,
1 GiB by default; the embedded set at 96 px is 226 MB), the first epoch
decodes every training record once, in file order, into a tensor on the
host, and every epoch then gathers its batches from it instead of decoding
again: the epoch's positions are cut into batches as tensors (shard, skip and
drop_remainder as the Dataset ops would), so tf.data sees one element per
BATCH, one gather and one flip of the flipped rows each. On a 2-core machine
the input competes with the train step for the same cores (tiny_cnn read
its data at 0.62x the synthetic rate decoding every epoch, 0.88x with
per-element gathers); the order, the flips and the values are exactly the
decoding path's, so a run and its resume agree whichever path they take.
Validation batches are cached the same way (tf.data ``cache``) and the val
pipeline is built once.

The permutation is ``argsort(stateless_uniform(seed=(seed, epoch)))``, not
``Dataset.shuffle(seed=...)``: tf.data's shuffle order also depends on the
global seed (tf.random.set_seed / keras.utils.set_random_seed change it), so
the same (seed, epoch) could give two orders in two processes. The price is
the same as a full-epoch shuffle buffer: one epoch of undecoded elements is
held in memory while the epoch starts.
"""

import os

import numpy as np
import tensorflow as tf

from engine.data import csv_source, embedded, tfrecord
from engine.data.decode import decode_for_eval, error_line
from engine.data.errors import DataError

AUTOTUNE = tf.data.AUTOTUNE
_SHUFFLE_SALT, _AUGMENT_SALT = 0x5EED, 0xA06


def _key(seed, epoch, salt):
    return tf.random.experimental.stateless_fold_in(
        tf.constant([seed, epoch], tf.int64), tf.constant(salt, tf.int64))


def epoch_permutation(n, seed, epoch):
    """The order of the n training elements in one epoch; depends on nothing else."""
    keys = tf.random.stateless_uniform([n], _key(seed, epoch, _SHUFFLE_SALT),
                                       minval=None, maxval=None, dtype=tf.int64)
    return tf.argsort(keys, stable=True)


def epoch_flips(n, seed, epoch):
    """Which of the epoch's n positions are flipped left-right: one draw per position.

    A vector drawn at once, not one draw per element, so a batch's flips are
    a gather (the decoded-cache path never runs per-element work).
    """
    return tf.random.stateless_uniform([n], _key(seed, epoch, _AUGMENT_SALT)) < 0.5


def flip_rows(x, flips):
    """The batch x [B, S, S, ...] with the rows where flips [B] is true flipped left-right.

    Only those rows are copied: a scatter of the reversed rows measured 2.7x
    faster (96 px, batch 32) than reversing the whole batch and selecting.
    """
    rows = tf.where(flips)
    return tf.tensor_scatter_nd_update(x, rows, tf.reverse(tf.gather_nd(x, rows), [2]))


class DataSource:
    """Label metadata plus train/val tf.data pipelines over one dataset.

    Built by open_data; ``_elements(split)`` yields the cheap undecoded
    elements in file order and ``_to_example`` turns one into
    (image bytes, multi-hot labels, 'where' string for messages).

    Why one class of ~300 lines: the epoch order, the resume skip, the
    decoded cache and the bad-record checks must all agree on the same
    element indices, and subclasses (TFRecord, CSV, segmentation) override
    only the hooks; split apart, each piece would need the others' indexing.
    """

    def __init__(self, *, label_names, source, description, num_train, num_val, label_prevalence,
                 seed=0):
        self.label_names = list(label_names)
        self.num_labels = len(self.label_names)
        self.source = source
        self.description = description
        self.num_train = int(num_train)
        self.num_val = int(num_val)
        self.label_prevalence = np.asarray(label_prevalence, np.float64)
        self.seed = seed  # open_data's seed; the pipelines take theirs explicitly
        self.skipped_records = 0  # --skip_bad_records: records left out
        self.bad_records = []  # ... and one line about each
        self._bad = {}  # split -> indices (in file order) of records left out
        self.decoded_cache_bytes = 1 << 30  # decode once when the split fits (0: never)
        self._decoded = {}  # input_size -> (images, targets) host tensors, train split, file order
        self._val = {}  # (global_batch, input_size) -> the validation dataset, built once

    def __repr__(self):
        return f"DataSource({self.description})"

    def steps_per_epoch(self, global_batch):
        if global_batch <= 0:
            raise DataError(f"--batch_size={global_batch} must be positive")
        steps = self.num_train // global_batch
        if steps == 0:
            raise DataError(f"--batch_size={global_batch} is larger than the {self.num_train} "
                            f"training examples of {self.description}")
        return steps

    def train_dataset(self, *, epoch, global_batch, input_size, seed, skip_batches=0, augment=True,
                      num_shards=1, shard_index=0):
        """Exactly one epoch of (images [B,S,S,3] float32 0..255, labels [B,L] float32)."""
        self._check(global_batch, input_size)
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise DataError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")
        if skip_batches < 0:
            raise DataError(f"skip_batches={skip_batches} must be >= 0")
        n = self.num_train
        perm = epoch_permutation(n, seed, epoch)
        flips = epoch_flips(n, seed, epoch) if augment else None
        decoded = self._decoded_train(input_size)
        if decoded is not None:
            return self._cached_batches(decoded, perm, flips, global_batch, skip_batches,
                                        num_shards, shard_index)
        ds = self._checked_elements("train").batch(n).take(1)
        ds = ds.map(lambda *cols: tuple(self._gather(c, perm, n) for c in cols)).unbatch()
        ds = ds.enumerate()
        if num_shards > 1:  # equal shares, so every worker runs the same number of steps
            ds = ds.take(n // num_shards * num_shards).shard(num_shards, shard_index)
        ds = ds.skip(skip_batches * global_batch)

        def example(index, elem):
            return self._load(elem, input_size, None if flips is None else flips[index])

        ds = ds.map(example, num_parallel_calls=AUTOTUNE, deterministic=True)
        return ds.batch(global_batch, drop_remainder=True).prefetch(AUTOTUNE)

    def _cached_batches(self, decoded, perm, flips, global_batch, skip_batches, num_shards,
                        shard_index):
        """train_dataset's batches gathered from the decoded split: one tf.data element per batch.

        The positions go through what the decoding path's Dataset ops do
        (take + shard, skip, batch with drop_remainder), as index arithmetic.
        """
        n = self.num_train
        positions = np.arange(n // num_shards * num_shards)[shard_index::num_shards]
        positions = positions[skip_batches * global_batch:]
        batches = len(positions) // global_batch
        positions = positions[:batches * global_batch].reshape([batches, global_batch])
        rows = tf.gather(perm, positions)
        columns = (rows,) if flips is None else (rows, tf.gather(flips, positions))

        def batch(rows, flips=None):
            images, targets = (tf.gather(v, rows) for v in decoded)
            return (images, targets) if flips is None else self._flip_batch(images, targets, flips)

        ds = tf.data.Dataset.from_tensor_slices(columns)
        return ds.map(batch, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)

    def val_dataset(self, *, global_batch, input_size):
        """One deterministic pass over the validation split, in file order, last batch kept.

        Built once per (batch, size) and iterated at every evaluation; its
        decoded batches are cached in memory when they fit.
        """
        self._check(global_batch, input_size)
        key = (global_batch, input_size)
        if key not in self._val:
            def example(*elem):
                return self._load(elem, input_size, None)

            ds = self._checked_elements("val").map(example, num_parallel_calls=AUTOTUNE,
                                                   deterministic=True)
            ds = ds.batch(global_batch, drop_remainder=False)
            if self._fits(self.num_val, input_size):
                ds = ds.cache()
            self._val[key] = ds.prefetch(AUTOTUNE)
        return self._val[key]

    def _fits(self, count, input_size):
        return count * self.decoded_example_bytes(input_size) <= self.decoded_cache_bytes

    @property
    def cached_input_sizes(self):
        """The input sizes whose decoded train split is held in host memory.

        At most one: the cache keeps one size at a time. A tool sizing
        --decoded_cache_mb can see whether the cache was used at all.
        """
        return tuple(self._decoded)

    def drop_decoded_cache(self):
        """Frees the decoded train split; the next epoch decodes (or caches) again."""
        self._decoded = {}

    def decoded_example_bytes(self, input_size):
        """Host bytes of one decoded example: float32 pixels and float32 label vector."""
        return input_size * input_size * 3 * 4 + self.num_labels * 4

    def _decoded_train(self, input_size):
        """(images, targets) host tensors of the whole decoded train split, or None.

        Decoded on first use (in file order, no flip) when it fits in
        decoded_cache_bytes; rows line up with epoch_permutation's indices.
        """
        if input_size in self._decoded:
            return self._decoded[input_size]
        if not self._fits(self.num_train, input_size):
            return None
        images, targets = [], []
        ds = self._checked_elements("train").map(lambda *elem: self._decode_example(elem, input_size),
                                                 num_parallel_calls=AUTOTUNE, deterministic=True)
        try:
            for image, target in ds.batch(256).prefetch(1):
                images.append(image.numpy())
                targets.append(target.numpy())
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError,
                tf.errors.NotFoundError) as e:  # a bad record: name it, as reading would
            error = self.explain_error("train", e)
            if error is None:
                raise
            raise error from None
        count = sum(len(i) for i in images)
        if count != self.num_train:
            raise DataError(f"{self.description}: {count} training records read, "
                            f"{self.num_train} counted when the data was opened; "
                            f"did the files change?")
        # Eager tensors, captured by reference by the epochs' map functions (not
        # variables: those would turn mirrored if opened under a strategy scope).
        with tf.device("/cpu:0"):
            self._decoded = {input_size: tuple(
                tf.convert_to_tensor(np.concatenate(parts))
                for parts in (images, targets))}  # one size at a time: the old one is freed
        return self._decoded[input_size]

    def _check(self, global_batch, input_size):
        if global_batch <= 0:
            raise DataError(f"--batch_size={global_batch} must be positive")
        if input_size <= 0:
            raise DataError(f"--input_size={input_size} must be positive")

    @staticmethod
    def _gather(column, perm, n):
        check = tf.debugging.assert_equal(tf.shape(column, out_type=tf.int64)[0], tf.cast(n, tf.int64),
                                          message="training files changed since open_data counted them")
        with tf.control_dependencies([check]):
            return tf.gather(column, perm)

    def _load(self, elem, input_size, flip):
        """(image, labels) of one undecoded element; flip: a bool tensor, or None for no flip.

        A source whose labels are images too (segmentation masks) overrides
        _decode_example, _flip and _flip_batch to resize and flip them alike.
        """
        image, target = self._decode_example(elem, input_size)
        if flip is not None:
            image, target = self._flip(image, target, flip)
        return image, target

    def _decode_example(self, elem, input_size):
        """(image, labels) of one undecoded element, before augmentation."""
        image_bytes, labels, where, *declared = self._to_example(*elem)
        return decode_for_eval(image_bytes, input_size, where,
                               declared[0] if declared else None), labels

    @staticmethod
    def _flip(image, target, flip):
        """The left-right flip of one example, where flip is true."""
        return tf.where(flip, tf.reverse(image, [1]), image), target

    @staticmethod
    def _flip_batch(images, targets, flips):
        """_flip of a whole batch [B, ...], flips [B]."""
        return flip_rows(images, flips), targets

    # ------------------------------------------------------------ bad records
    def _checked_elements(self, split):
        """_elements(split) without the records skip_bad_records left out."""
        ds = self._elements(split)
        bad = self._bad.get(split)
        if bad is None or not len(bad):
            return ds
        bad = tf.constant(bad, tf.int64)
        return ds.enumerate().filter(
            lambda i, elem: tf.logical_not(tf.reduce_any(tf.equal(i, bad)))).map(lambda i, elem: elem)

    def _check_pass(self, split):
        """(index, labels) of every record that loads, in file order (each one decoded once)."""
        def load(i, elem):
            image, labels = self._load(elem, 8, None)  # every check runs; 8 px: a cheap resize
            # Outputs that depend on the decoded pixels: tf.data prunes a decode
            # whose result is unused (an undecodable image would then pass).
            used = tf.reduce_sum(image) + tf.reduce_sum(tf.cast(labels, tf.float32))
            return i, labels, used

        return (self._elements(split).enumerate()
                .map(load, num_parallel_calls=AUTOTUNE, deterministic=True).ignore_errors()
                .map(lambda i, labels, used: (i, labels)))

    def _where(self, elem):
        """The 'where' string of an element, for messages (runs no check)."""
        try:
            pair = getattr(self, "_pair", None)
            return (pair(*elem) if pair is not None else self._to_example(*elem))[2]
        except tf.errors.OpError:
            return "a record"

    def _describe(self, split, indices):
        """One line for each record at these indices: why it does not load."""
        wanted = tf.constant(sorted(indices), tf.int64)
        lines = []
        for _, elem in self._elements(split).enumerate().filter(
                lambda i, elem: tf.reduce_any(tf.equal(i, wanted))):
            try:
                self._load(elem, 8, None)
                lines.append(f"{_as_text(self._where(elem))}: loads now (changed meanwhile?)")
            except tf.errors.OpError as e:
                lines.append(error_line(e, _as_text(self._where(elem))))
        return lines

    def skip_bad_records(self, unreadable=(), unreadable_count=None):
        """Finds every record that does not load and leaves it out of both splits.

        unreadable: lines about records the source could not even read (a
        corrupt TFRecord tail); unreadable_count: how many records those lines
        leave out (default: one each). Updates the counts, the label
        prevalence (when labels are vectors) and the description.
        """
        self.bad_records = list(unreadable)
        self.skipped_records = (len(self.bad_records) if unreadable_count is None
                                else int(unreadable_count))
        for split in ("train", "val"):
            total = int(self._elements(split).reduce(np.int64(0), lambda n, _: n + 1))
            good, sums = [], None
            for i, labels in self._check_pass(split).batch(1024):
                good.append(i.numpy())
                if labels.shape.rank == 2:
                    part = labels.numpy().astype(np.float64).sum(0)
                    sums = part if sums is None else sums + part
            good = np.concatenate(good) if good else np.zeros([0], np.int64)
            bad = np.setdiff1d(np.arange(total, dtype=np.int64), good)
            self._bad[split] = bad
            if len(bad):
                self.bad_records += self._describe(split, bad[:5])
                if len(bad) > 5:
                    self.bad_records.append(f"... and {len(bad) - 5} more bad {split} records")
            self.skipped_records += len(bad)
            if split == "train":
                self.num_train = len(good)
                if sums is not None and len(good):
                    self.label_prevalence = sums / len(good)
            else:
                self.num_val = len(good)
        if self.num_train == 0:
            raise DataError(f"{self.description}: no training record loads "
                            f"({self.bad_records[0] if self.bad_records else ''})")
        if self.skipped_records:
            self.description += f"; {self.skipped_records} bad records left out"

    def explain_error(self, split, error):
        """A DataError naming the file and record behind a TensorFlow error, else None.

        Our own checks already name them; for an image that does not decode,
        this loads the split's records in file order until it finds it.
        """
        text = getattr(error, "message", None) or str(error)
        if "assertion failed:" in text:
            return DataError(error_line(error) + " (--skip_bad_records leaves such records out)")
        expected = 0
        for i, _ in self._check_pass(split):
            if int(i) != expected:
                break
            expected += 1
        else:
            total = int(self._elements(split).reduce(np.int64(0), lambda n, _: n + 1))
            if expected >= total:
                return None
        line = self._describe(split, [expected])[0]
        return DataError(line + " (--skip_bad_records leaves such records out)")

    def _elements(self, split):
        raise NotImplementedError

    def _to_example(self, *elem):
        raise NotImplementedError


class _TFRecordSource(DataSource):
    def __init__(self, files, counts=None, **kw):
        super().__init__(**kw)
        self.files = files  # split -> the TFRecord files read, in order
        self._counts = counts or {}  # split -> records readable per file (None: all)

    def _elements(self, split):
        return tfrecord.file_records(self.files[split], self._counts.get(split))

    def _to_example(self, serialized, filename, index):
        return tfrecord.parse(serialized, filename, index, self.num_labels, with_size=True)

    def _where(self, elem):
        _, filename, index = elem
        return tf.strings.join([filename, " record ", tf.strings.as_string(index)])


def _as_text(value):
    value = value.numpy() if hasattr(value, "numpy") else value
    return value.decode() if isinstance(value, bytes) else str(value)


class _CsvSource(DataSource):
    def __init__(self, arrays, **kw):
        super().__init__(**kw)
        self._arrays = arrays  # split -> (paths, multi_hot)

    def _elements(self, split):
        paths, hot = self._arrays[split]
        return tf.data.Dataset.from_tensor_slices((paths.astype(str), hot))

    def _to_example(self, path, labels):
        return tf.io.read_file(path), labels, path


def _open_tfrecords(data_dir, source, seed, skip_bad_records=False):
    def glob(*patterns):
        return sorted({f for p in patterns for f in tf.io.gfile.glob(os.path.join(data_dir, p))})

    files = {"train": glob("train-*.tfrecord*"), "val": glob("val-*.tfrecord*", "validation-*.tfrecord*")}
    if not files["val"]:
        raise DataError(f"--data_dir={data_dir} has train-*.tfrecord files but no val-*.tfrecord files")
    names = tfrecord.read_labels_txt(os.path.join(data_dir, "labels.txt"))
    if skip_bad_records:
        counts, unreadable, dropped = {}, [], 0
        for split in ("train", "val"):
            counts[split], lines, lost = tfrecord.scan(files[split], len(names), skip_bad=True)
            unreadable += lines
            dropped += lost
        num_train, num_val = sum(counts["train"]), sum(counts["val"])
        positives = np.zeros(len(names))  # recounted over the records that load
    else:
        counts, unreadable = None, ()
        num_train, positives = tfrecord.scan(files["train"], len(names))
        num_val, _ = tfrecord.scan(files["val"], len(names))
    if num_train == 0:
        raise DataError(f"--data_dir={data_dir}: the train-*.tfrecord files hold no records")
    desc = (f"{source} {data_dir} ({num_train} train / {num_val} val, {len(names)} labels, "
            f"{len(files['train'])}+{len(files['val'])} files)")
    data = _TFRecordSource(files, counts=counts, label_names=names, source=source, description=desc,
                           num_train=num_train, num_val=num_val,
                           label_prevalence=positives / num_train, seed=seed)
    if skip_bad_records:
        data.skip_bad_records(unreadable, unreadable_count=dropped)
    return data


def open_classification_data(data_dir, cache_dir, seed=0, val_fraction=0.1,
                             skip_bad_records=False):
    """Open the user's data (TFRecords, or images + CSV) or, with no data_dir, the embedded set.

    ``seed`` is kept on the DataSource for the caller; it does not change the
    embedded data (fixed generator seed) nor the CSV validation split (a hash
    of the image name), so validation numbers stay comparable across seeds.
    """
    if not data_dir:
        return _open_tfrecords(embedded.ensure(os.path.expanduser(cache_dir)), "embedded", seed,
                               skip_bad_records)
    data_dir = os.path.expanduser(data_dir)
    if not os.path.exists(data_dir):
        raise DataError(f"--data_dir={data_dir} does not exist")
    if not os.path.isdir(data_dir):
        raise DataError(f"--data_dir={data_dir} is not a directory")
    if tf.io.gfile.glob(os.path.join(data_dir, "train-*.tfrecord*")):
        return _open_tfrecords(data_dir, "tfrecord", seed, skip_bad_records)
    csv_path = csv_source.find_csv(data_dir)
    if csv_path is None:
        raise DataError(f"--data_dir={data_dir} has no train-*.tfrecord files and no labels.csv")
    missing = [] if skip_bad_records else None  # rows naming no file: listed, not raised
    names, train, val, how = csv_source.read(data_dir, csv_path, val_fraction, skipped=missing)
    desc = f"csv {how} ({len(train[0])} train / {len(val[0])} val, {len(names)} labels)"
    data = _CsvSource({"train": train, "val": val}, label_names=names, source="csv", description=desc,
                      num_train=len(train[0]), num_val=len(val[0]), label_prevalence=train[1].mean(0),
                      seed=seed)
    if skip_bad_records:
        data.skip_bad_records(missing)
    return data
