"""Tests for engine.data: embedded set, exact-resume determinism, TFRecords, CSV, errors."""

import json
import re
import os

import numpy as np
import pytest
import tensorflow as tf

from engine.data import DataError, DataSource, open_data
from engine.data import csv_source, embedded
from engine.data.source import epoch_flips, flip_rows
from engine.data.tfrecord import write_tfrecords


def _batches(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


def _indexed_images(n, size=4):
    """Image i has red channel i and a left-to-right green ramp, so id and flip are visible."""
    imgs = np.zeros((n, size, size, 3), np.uint8)
    imgs[..., 0] = np.arange(n, dtype=np.uint8)[:, None, None]
    imgs[..., 1] = (np.arange(size) * 40)[None, None, :]
    return imgs


def _ids_and_flips(images):
    return images[:, 0, 0, 0].astype(int).tolist(), (images[:, 0, 0, 1] > images[:, 0, -1, 1]).tolist()


def _write_labels_txt(d, names):
    (d / "labels.txt").write_text("\n".join(names) + "\n")


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return cache, open_data(None, cache)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """40 train / 6 val tiny records whose pixels say which example they are."""
    d = tmp_path_factory.mktemp("indexed")
    rng = np.random.default_rng(0)
    labels = [sorted(rng.choice(5, rng.integers(0, 3), replace=False).tolist()) for _ in range(46)]
    imgs = _indexed_images(46)
    write_tfrecords(str(d / "train"), imgs[:40], labels[:40], num_shards=3)
    write_tfrecords(str(d / "val"), imgs[40:], labels[40:])
    _write_labels_txt(d, list("abcde"))
    return open_data(str(d), str(d / "cache")), imgs, labels


# ---------------------------------------------------------------- embedded


def test_embedded_files_counts_and_prevalence_read_back(emb):
    cache, data = emb
    d = os.path.join(cache, embedded.DIRNAME)
    assert sorted(os.listdir(d)) == sorted(
        [f"train-0000{i}-of-00004.tfrecord" for i in range(4)]
        + ["val-00000-of-00001.tfrecord", "labels.txt", "meta.json"])
    assert data.source == "embedded" and isinstance(data, DataSource)
    assert (data.num_train, data.num_val, data.num_labels) == (2048, 512, 13)
    assert data.label_names == open(os.path.join(d, "labels.txt")).read().split()

    spec = {"image/labels": tf.io.VarLenFeature(tf.int64), "image/encoded": tf.io.FixedLenFeature([], tf.string)}
    hot, n = np.zeros(13), 0
    files = sorted(tf.io.gfile.glob(os.path.join(d, "train-*")))
    for batch in tf.data.TFRecordDataset(files).batch(512).map(lambda r: tf.io.parse_example(r, spec)):
        dense = tf.sparse.to_dense(batch["image/labels"], default_value=-1).numpy()
        for row in dense:
            hot[row[row >= 0]] += 1
        n += len(dense)
        assert tf.io.decode_png(batch["image/encoded"][0]).shape == (64, 64, 3)
    prevalence = hot / n
    assert n == 2048
    assert ((prevalence > 0.85) & (prevalence < 0.95)).sum() == 2
    assert (prevalence < 0.1).sum() >= 9
    np.testing.assert_allclose(data.label_prevalence, prevalence)
    meta = json.load(open(os.path.join(d, "meta.json")))
    assert meta["num_train"] == 2048 and meta["num_val"] == 512


def test_embedded_second_open_does_not_regenerate(emb):
    cache, _ = emb
    d = os.path.join(cache, embedded.DIRNAME)
    before = {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in os.listdir(d)}
    again = open_data("", cache)
    assert {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in os.listdir(d)} == before
    assert (again.num_train, again.num_val) == (2048, 512)
    assert os.listdir(cache) == [embedded.DIRNAME]  # no temp dirs left behind


def test_embedded_creation_race_keeps_the_winner(tmp_path, monkeypatch):
    final = tmp_path / embedded.DIRNAME
    real_rename = os.rename

    def other_process_wins(src, dst):
        os.makedirs(dst)
        (final / "meta.json").write_text('{"winner": true}')
        real_rename(src, dst)  # raises: dst exists and is not empty

    monkeypatch.setattr(embedded.os, "rename", other_process_wins)
    assert embedded.ensure(str(tmp_path), num_train=8, num_val=4) == str(final)
    assert json.loads((final / "meta.json").read_text()) == {"winner": True}
    assert os.listdir(tmp_path) == [embedded.DIRNAME]


def test_embedded_resume_skip_matches_uninterrupted(emb):
    _, data = emb
    kw = dict(epoch=3, global_batch=128, input_size=32, seed=5)
    full = _batches(data.train_dataset(**kw))
    assert len(full) == data.steps_per_epoch(128) == 16
    resumed = _batches(data.train_dataset(skip_batches=13, **kw))
    assert len(resumed) == 3
    for (xa, ya), (xb, yb) in zip(full[13:], resumed):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    x, _ = full[0]
    assert x.dtype == np.float32 and x.shape == (128, 32, 32, 3) and 0 <= x.min() and x.max() <= 255


# ---------------------------------------------------------------- determinism


def test_order_is_a_pure_function_of_seed_and_epoch(indexed):
    data, _, _ = indexed

    def run(**kw):
        args = dict(epoch=0, global_batch=4, input_size=4, seed=1)
        args.update(kw)
        return np.concatenate([x for x, _ in _batches(data.train_dataset(**args))])

    base = run()
    ids, flips = _ids_and_flips(base)
    assert len(ids) == 40 and sorted(ids) == list(range(40)) and ids != list(range(40))
    assert 5 < sum(flips) < 35  # augmentation flips some, not all
    np.testing.assert_array_equal(run(), base)
    tf.random.set_seed(1234)  # the global seed must not matter (it does for Dataset.shuffle)
    np.testing.assert_array_equal(run(), base)
    np.testing.assert_array_equal(run(skip_batches=3), base[12:])  # same images, same flips
    assert _ids_and_flips(run(epoch=1))[0] != ids
    assert _ids_and_flips(run(seed=2))[0] != ids
    assert _ids_and_flips(run(augment=False))[0] == ids and not any(_ids_and_flips(run(augment=False))[1])


def test_shards_are_disjoint_and_cover_the_epoch(indexed):
    data, _, _ = indexed
    full = _ids_and_flips(np.concatenate(
        [x for x, _ in _batches(data.train_dataset(epoch=2, global_batch=4, input_size=4, seed=0))]))
    shards = []
    for k in range(2):
        ds = data.train_dataset(epoch=2, global_batch=2, input_size=4, seed=0, num_shards=2, shard_index=k)
        shards.append(_ids_and_flips(np.concatenate([x for x, _ in _batches(ds)])))
    assert not set(shards[0][0]) & set(shards[1][0])
    assert sorted(shards[0][0] + shards[1][0]) == list(range(40))
    for k in range(2):  # every 2nd example of the same epoch, with the same flips
        assert shards[k][0] == full[0][k::2] and shards[k][1] == full[1][k::2]


# ---------------------------------------------------------------- user TFRecords


def test_user_tfrecords_read_back_pixels_and_labels(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (14, 8, 8, 3), dtype=np.uint8)
    labels = [sorted(rng.choice(4, rng.integers(0, 4), replace=False).tolist()) for _ in range(14)]
    write_tfrecords(str(tmp_path / "train"), imgs[:10], labels[:10], names=[f"t{i}" for i in range(10)], num_shards=2)
    write_tfrecords(str(tmp_path / "val"), imgs[10:], labels[10:])
    _write_labels_txt(tmp_path, ["w", "x", "y", "z"])
    data = open_data(str(tmp_path), str(tmp_path / "cache"))
    hot = np.zeros((14, 4), np.float32)
    for i, l in enumerate(labels):
        hot[i, l] = 1
    assert (data.source, data.label_names, data.num_train, data.num_val) == ("tfrecord", list("wxyz"), 10, 4)
    np.testing.assert_allclose(data.label_prevalence, hot[:10].mean(0))

    (xv, yv), = _batches(data.val_dataset(global_batch=8, input_size=8))
    np.testing.assert_array_equal(xv, imgs[10:].astype(np.float32))
    np.testing.assert_array_equal(yv, hot[10:])

    xs, ys = zip(*_batches(data.train_dataset(epoch=0, global_batch=5, input_size=8, seed=0, augment=False)))
    xs, ys = np.concatenate(xs), np.concatenate(ys)
    for x, y in zip(xs, ys):
        i = next(i for i in range(10) if np.array_equal(imgs[i], x))
        np.testing.assert_array_equal(y, hot[i])


def test_jpeg_records_decode(tmp_path):
    img = np.full((10, 6, 3), 128, np.uint8)
    write_tfrecords(str(tmp_path / "train"), [tf.io.encode_jpeg(img).numpy()] * 2, [[0], []])
    write_tfrecords(str(tmp_path / "val"), [img], [[0]])
    _write_labels_txt(tmp_path, ["only"])
    data = open_data(str(tmp_path), str(tmp_path))
    (x, y), = _batches(data.train_dataset(epoch=0, global_batch=2, input_size=16, seed=0))
    assert x.shape == (2, 16, 16, 3) and np.abs(x - 128).max() < 3
    assert sorted(y[:, 0].tolist()) == [0.0, 1.0]


def test_label_index_out_of_range_named_at_open(tmp_path):
    write_tfrecords(str(tmp_path / "train"), _indexed_images(3), [[0], [5], [1]])
    write_tfrecords(str(tmp_path / "val"), _indexed_images(1), [[0]])
    _write_labels_txt(tmp_path, ["a", "b", "c"])
    with pytest.raises(DataError, match=r"train-00000-of-00001\.tfrecord record 1: label index 5"):
        open_data(str(tmp_path), str(tmp_path))


def test_bad_records_named_when_iterated(tmp_path):
    """Files that change after open_data (or bad image bytes) fail naming the file, not as NaN."""
    train = write_tfrecords(str(tmp_path / "train"), _indexed_images(4), [[0]] * 4)[0]
    write_tfrecords(str(tmp_path / "val"), [b"not an image"], [[1]])
    _write_labels_txt(tmp_path, ["a", "b"])
    data = open_data(str(tmp_path), str(tmp_path))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"val-00000-of-00001\.tfrecord record 0: image is not"):
        _batches(data.val_dataset(global_batch=1, input_size=4))
    write_tfrecords(str(tmp_path / "train"), _indexed_images(4), [[0], [1], [7], [0]])
    # the decoded cache reads the split when the epoch is built: a DataError naming it
    with pytest.raises((tf.errors.InvalidArgumentError, DataError),
                       match=os.path.basename(train) + r" record 2: label index"):
        _batches(data.train_dataset(epoch=0, global_batch=2, input_size=4, seed=0))


# ---------------------------------------------------------------- images + CSV


def _csv_name(i):
    """Names as written in the CSV: with an extension, or without (resolved to .jpg or .png)."""
    return f"img_{i:02d}" + (".png" if i % 3 == 1 else "")


def _planet_dir(tmp_path, n=12):
    (tmp_path / "images").mkdir()
    tags = ["clear primary", "haze", "agriculture clear water", "cloudy", ""]
    for i, img in enumerate(_indexed_images(n, size=6)):  # PNG bytes even in .jpg: decode sniffs
        tf.io.write_file(str(tmp_path / "images" / f"img_{i:02d}{'.jpg' if i % 3 == 0 else '.png'}"),
                         tf.io.encode_png(img))
    rows = [f"{_csv_name(i)},{tags[i % len(tags)]}" for i in range(n)]
    (tmp_path / "labels.csv").write_text("image_name,tags\n" + "\n".join(rows) + "\n")
    return tags


def test_csv_planet_format(tmp_path):
    tags = _planet_dir(tmp_path)
    data = open_data(str(tmp_path), str(tmp_path / "cache"), val_fraction=0.3)
    names = sorted({t for s in tags for t in s.split()})
    assert data.source == "csv" and data.label_names == names
    val_ids = [i for i in range(12) if csv_source.in_val(_csv_name(i), 0.3)]
    assert 0 < len(val_ids) < 12 and data.num_val == len(val_ids) and data.num_train == 12 - len(val_ids)

    def expected(i):
        return np.array([float(t in tags[i % len(tags)].split()) for t in names], np.float32)

    xs, ys = zip(*_batches(data.val_dataset(global_batch=4, input_size=6)))
    assert _ids_and_flips(np.concatenate(xs))[0] == val_ids
    np.testing.assert_array_equal(np.concatenate(ys), [expected(i) for i in val_ids])
    xs, ys = zip(*_batches(data.train_dataset(epoch=0, global_batch=1, input_size=6, seed=0, augment=False)))
    ids = _ids_and_flips(np.concatenate(xs))[0]
    assert sorted(ids) == sorted(set(range(12)) - set(val_ids))
    np.testing.assert_array_equal(np.concatenate(ys), [expected(i) for i in ids])
    train_ids = sorted(ids)
    np.testing.assert_allclose(data.label_prevalence, np.mean([expected(i) for i in train_ids], 0))


def test_csv_val_csv_is_used(tmp_path):
    _planet_dir(tmp_path)
    (tmp_path / "val.csv").write_text("image_name,tags\nimg_01,haze\nimg_02,haze water\n")
    data = open_data(str(tmp_path), str(tmp_path))
    assert (data.num_train, data.num_val) == (12, 2)


@pytest.mark.parametrize("content, pattern", [
    ("image_name,tags\nimg_00,haze\nimg_01,haze\nnope,clear\n", r"labels\.csv line 4: image 'nope' not found in .*images"),
    ("name,labels\nimg_00,haze\n", r"labels\.csv line 1: header must be 'image_name,tags'"),
    ("image_name,tags\n", r"labels\.csv has a header but no rows"),
    ("", r"labels\.csv is empty"),
    ("image_name,tags\nimg_00,\nimg_01,\n", r"labels\.csv has no tags in any row"),
])
def test_csv_errors(tmp_path, content, pattern):
    (tmp_path / "images").mkdir()
    for i in range(2):
        tf.io.write_file(str(tmp_path / "images" / f"img_{i:02d}.png"), tf.io.encode_png(_indexed_images(1)[0]))
    (tmp_path / "labels.csv").write_text(content)
    with pytest.raises(DataError, match=pattern):
        open_data(str(tmp_path), str(tmp_path))


# ---------------------------------------------------------------- flags and dirs


def test_data_dir_errors(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=f"--data_dir={missing} does not exist"):
        open_data(missing, str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has no train-\*\.tfrecord files and no labels\.csv"):
        open_data(str(tmp_path / "empty"), str(tmp_path))


def test_batch_size_errors(indexed):
    data, _, _ = indexed
    assert data.steps_per_epoch(8) == 5
    for bad in (0, 41):
        with pytest.raises(DataError, match=f"--batch_size={bad}"):
            data.steps_per_epoch(bad)


# ---------------------------------------------------------------- bad records: named, or skipped and counted


def _example(image, labels=(), vector=None, hw=None):
    """One serialized record; image: uint8 array (PNG encoded here) or raw bytes."""
    data = image if isinstance(image, bytes) else tf.io.encode_png(image).numpy()
    feats = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
             "image/labels": tf.train.Feature(int64_list=tf.train.Int64List(value=list(labels)))}
    if vector is not None:
        feats["image/label_vector"] = tf.train.Feature(float_list=tf.train.FloatList(value=vector))
    if hw is not None:
        feats["image/height"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[hw[0]]))
        feats["image/width"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[hw[1]]))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def _write(path, records):
    with tf.io.TFRecordWriter(str(path)) as w:
        for r in records:
            w.write(r)
    return str(path)


def _corrupt_record(path, index):
    """Flips a byte inside record `index`'s payload (its CRC no longer matches)."""
    data = bytearray(open(path, "rb").read())
    offset = 0
    for _ in range(index):
        offset += 8 + 4 + int.from_bytes(data[offset:offset + 8], "little") + 4
    data[offset + 12 + 5] ^= 0xFF
    open(path, "wb").write(bytes(data))


GOOD = _indexed_images(1, size=8)[0]
TRUNCATED_PNG = tf.io.encode_png(GOOD).numpy()[:40]  # a PNG header, then nothing


def _bad_dir(tmp_path, kinds):
    """5 labels; train-00000 holds 12 good records with the given bad ones at 3, 7, 11 ...,
    train-00001 4 good ones (its last one corrupt with 'corrupt'); val 4 good (+ an
    undecodable one with 'val_decode')."""
    bad = {"decode": _example(TRUNCATED_PNG, [0]),
           "width": _example(GOOD, vector=[1.0, 0.0, 0.0, 0.0, 0.0, 1.0]),
           "size": _example(_indexed_images(1, size=6)[0], [1], hw=(8, 8)),
           "nan_label": _example(GOOD, vector=[0.0, np.nan, 0.0, 0.0, 0.0])}
    records = [_example(GOOD, [i % 5], hw=(8, 8)) for i in range(12)]
    for slot, kind in zip((3, 7, 11, 1), [k for k in kinds if k in bad]):
        records.insert(slot, bad[kind])
    _write(tmp_path / "train-00000-of-00002.tfrecord", records)
    second = _write(tmp_path / "train-00001-of-00002.tfrecord",
                    [_example(GOOD, vector=[0.5, 0.5, 0.0, 0.0, 1.0]) for _ in range(4)])
    if "corrupt" in kinds:
        _corrupt_record(second, 3)
    val = [_example(GOOD, [2]) for _ in range(4)] + (
        [_example(b"\x89PNG not really")] if "val_decode" in kinds else [])
    _write(tmp_path / "val-00000-of-00001.tfrecord", val)
    _write_labels_txt(tmp_path, list("abcde"))
    return str(tmp_path)


@pytest.mark.parametrize("kind, pattern", [
    ("corrupt", r"train-00001-of-00002\.tfrecord record 3: cannot be read \(corrupt or cut short"),
    ("width", r"train-00000-of-00002\.tfrecord record 3: label vector has 6 values; labels\.txt names 5"),
    ("nan_label", r"train-00000-of-00002\.tfrecord record 3: label vector value nan is not in \[0, 1\]"),
])
def test_bad_records_found_when_opened_are_named(tmp_path, kind, pattern):
    with pytest.raises(DataError, match=pattern):
        open_data(_bad_dir(tmp_path, [kind]), str(tmp_path))


@pytest.mark.parametrize("kind, split, pattern", [
    ("decode", "train", r"train-00000-of-00002\.tfrecord record 3: image does not decode"),
    ("size", "train", r"train-00000-of-00002\.tfrecord record 3: image is 6x6 but the record says 8x8"),
    ("val_decode", "val", r"val-00000-of-00001\.tfrecord record 4: image does not decode \(Unknown image"),
])
def test_bad_records_met_when_read_are_named(tmp_path, kind, split, pattern):
    data = open_data(_bad_dir(tmp_path, [kind]), str(tmp_path))
    try:  # with the decoded cache, the train split is read when its first epoch is built
        _batches(data.train_dataset(epoch=0, global_batch=4, input_size=8, seed=0)
                 if split == "train" else data.val_dataset(global_batch=4, input_size=8))
    except DataError as e:
        error = e
    except tf.errors.OpError as e:
        error = data.explain_error(split, e)
    else:
        pytest.fail("the bad record was read without an error")
    assert isinstance(error, DataError) and "\n" not in str(error)
    assert re.search(pattern, str(error)), str(error)
    assert "--skip_bad_records" in str(error)


def test_skip_bad_records_leaves_them_out_and_counts_them(tmp_path):
    kinds = ["decode", "width", "size", "nan_label", "corrupt", "val_decode"]
    data = open_data(_bad_dir(tmp_path, kinds), str(tmp_path), skip_bad_records=True)
    # train: 12 + 3 good, 4 bad in file 0, the corrupt last record of file 1; val: 1 bad
    assert (data.num_train, data.num_val, data.skipped_records) == (15, 4, 6)
    text = " ".join(data.bad_records)
    for where in ("train-00000-of-00002.tfrecord record 1: label vector values must be in [0, 1]",
                  "record 4: image does not decode", "record 8: label vector has 6 values",
                  "record 12: image is 6x6 but the record says 8x8",
                  "train-00001-of-00002.tfrecord record 3: cannot be read",
                  "val-00000-of-00001.tfrecord record 4"):
        assert where in text, (where, text)
    hot = np.zeros(5)
    for i in range(12):
        hot[i % 5] += 1
    hot += 3 * np.array([0.5, 0.5, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(data.label_prevalence, hot / 15)
    xs, ys = zip(*_batches(data.train_dataset(epoch=0, global_batch=5, input_size=8, seed=0)))
    assert len(xs) == 3 and np.all(np.isfinite(np.concatenate(xs)))
    assert sorted(np.concatenate(ys).sum(1).tolist()) == [1.0] * 12 + [2.0] * 3
    (xv, yv), = _batches(data.val_dataset(global_batch=8, input_size=8))
    assert xv.shape[0] == 4


def test_skip_bad_records_in_csv_data(tmp_path):
    tags = _planet_dir(tmp_path)
    with open(tmp_path / "labels.csv", "a") as f:
        f.write("no_such_image,haze\n")
    tf.io.write_file(str(tmp_path / "images" / "broken.png"), TRUNCATED_PNG)
    with open(tmp_path / "labels.csv", "a") as f:
        f.write("broken.png,clear\n")
    with pytest.raises(DataError, match=r"labels\.csv line 14: image 'no_such_image' not found"):
        open_data(str(tmp_path), str(tmp_path / "cache"), val_fraction=0.0)
    data = open_data(str(tmp_path), str(tmp_path / "cache"), val_fraction=0.0,
                     skip_bad_records=True)
    assert data.num_train == 12 and data.skipped_records == 2
    assert "labels.csv line 14" in data.bad_records[0] and "broken.png: image does not decode" in \
        data.bad_records[1]


def _epoch(data, cached, **kw):
    data.decoded_cache_bytes = (1 << 30) if cached else 0
    return _batches(data.train_dataset(global_batch=8, input_size=kw.pop("input_size", 24), seed=3,
                                       **kw))


@pytest.mark.parametrize("kw", [dict(epoch=0), dict(epoch=2, skip_batches=5),
                                dict(epoch=1, augment=False),
                                dict(epoch=1, num_shards=2, shard_index=1, skip_batches=2)],
                         ids=["epoch0", "resume_skip", "no_augment", "shard"])
def test_decoded_cache_gives_exactly_the_decoding_paths_batches(embedded_cache, kw):
    data = open_data(None, embedded_cache)
    decoding = _epoch(data, cached=False, **dict(kw))
    assert data.cached_input_sizes == ()
    cached = _epoch(data, cached=True, **dict(kw))
    assert data.cached_input_sizes == (24,)  # the cached path really ran
    assert len(cached) == len(decoding) > 0
    for (xa, ya), (xb, yb) in zip(decoding, cached):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_decoded_cache_is_used_only_within_its_budget(embedded_cache):
    data = open_data(None, embedded_cache)
    assert data.decoded_example_bytes(16) == 16 * 16 * 3 * 4 + data.num_labels * 4
    data.decoded_cache_bytes = data.num_train * data.decoded_example_bytes(16)  # fits 16 px, not 24
    data.train_dataset(epoch=0, global_batch=8, input_size=16, seed=0)
    data.train_dataset(epoch=0, global_batch=8, input_size=24, seed=0)
    assert data.cached_input_sizes == (16,)


def test_val_dataset_is_built_once_and_reads_the_same_every_pass(embedded_cache):
    data = open_data(None, embedded_cache)
    ds = data.val_dataset(global_batch=100, input_size=16)
    assert data.val_dataset(global_batch=100, input_size=16) is ds
    first, second = _batches(ds), _batches(ds)
    uncached = open_data(None, embedded_cache)
    uncached.decoded_cache_bytes = 0
    fresh = _batches(uncached.val_dataset(global_batch=100, input_size=16))
    assert len(first) == len(second) == len(fresh) == 6  # 512 = 5 x 100 + 12
    for a, b, c in zip(first, second, fresh):
        for x, y, z in zip(a, b, c):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z)



def test_epoch_flips_are_a_pure_function_of_seed_and_epoch_and_flip_just_those_rows():
    flips = epoch_flips(1000, seed=3, epoch=1).numpy()
    np.testing.assert_array_equal(flips, epoch_flips(1000, seed=3, epoch=1).numpy())
    assert 400 < flips.sum() < 600
    assert (flips != epoch_flips(1000, seed=3, epoch=2).numpy()).sum() > 300  # a new epoch, new flips
    images = np.arange(5 * 2 * 3 * 3, dtype=np.float32).reshape([5, 2, 3, 3])
    some = np.array([True, False, False, True, True])
    expected = np.where(some[:, None, None, None], images[:, :, ::-1, :], images)
    np.testing.assert_array_equal(flip_rows(images, some), expected)
    np.testing.assert_array_equal(flip_rows(images, np.zeros(5, bool)), images)


def test_training_batches_are_the_unflipped_ones_flipped_where_epoch_flips_says(embedded_cache):
    data = open_data(None, embedded_cache)
    for cached in (False, True):
        plain = _epoch(data, cached, epoch=1, augment=False)[:3]
        augmented = _epoch(data, cached, epoch=1)[:3]
        flips = epoch_flips(data.num_train, seed=3, epoch=1).numpy()[:24].reshape([3, 8])
        for (x, y), (xa, ya), f in zip(plain, augmented, flips):
            np.testing.assert_array_equal(xa, np.where(f[:, None, None, None], x[:, :, ::-1], x))
            np.testing.assert_array_equal(ya, y)


def test_skip_bad_records_counts_the_rest_of_a_corrupt_file(tmp_path):
    """A bad CRC stops tf.data for the whole file: every record after it is left out too."""
    _bad_dir(tmp_path, [])
    second = str(tmp_path / "train-00001-of-00002.tfrecord")
    _corrupt_record(second, 1)  # of 4: records 1, 2 and 3 are lost
    data = open_data(str(tmp_path), str(tmp_path / "cache"), skip_bad_records=True)
    assert (data.num_train, data.skipped_records) == (13, 3)
    assert "record 1: cannot be read" in data.bad_records[0]
    assert "it and the 2 records after it are left out" in data.bad_records[0]
    with open(second, "r+b") as fh:  # cut short inside a record: the framing no longer adds up
        fh.truncate(os.path.getsize(second) - 7)
    data = open_data(str(tmp_path), str(tmp_path / "cache2"), skip_bad_records=True)
    assert "a number of records that cannot be told" in data.bad_records[0]


# ------------------------------------------------------- feeding replicas
@pytest.mark.parametrize("decoded", [True, False], ids=["decoded_cache", "decoding"])
@pytest.mark.parametrize("shards,shard,skip", [(1, 0, 0), (1, 0, 2), (2, 1, 1)],
                         ids=["epoch", "resumed", "worker_1_of_2_resumed"])
def test_each_replica_receives_the_rows_of_its_old_slice_on_its_device(indexed, decoded, shards,
                                                                        shard, skip):
    """Two replicas: replica j gets rows [j*b, (j+1)*b) of each worker batch, the slice the
    step used to cut on the device, with the same order, resume skip and worker shard."""
    from engine import distribute
    from engine.data.replicas import replica_batches
    data, _, _ = indexed
    saved = data.decoded_cache_bytes
    data.decoded_cache_bytes = saved if decoded else 0
    try:
        args = dict(epoch=1, global_batch=6, input_size=4, seed=3, skip_batches=skip,
                    num_shards=shards, shard_index=shard)
        whole = _batches(data.train_dataset(**args))
        strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
        fed = list(iter(replica_batches(data.train_dataset(**args), strategy)))
    finally:
        data.decoded_cache_bytes = saved
    assert len(fed) == len(whole) > 0
    for (images, labels), (want_images, want_labels) in zip(fed, whole):
        for j, (x, y) in enumerate(zip(strategy.experimental_local_results(images),
                                       strategy.experimental_local_results(labels))):
            assert x.device.endswith(f"device:CPU:{j}") and y.device.endswith(f"device:CPU:{j}")
            np.testing.assert_array_equal(x.numpy(), want_images[3 * j:3 * (j + 1)])
            np.testing.assert_array_equal(y.numpy(), want_labels[3 * j:3 * (j + 1)])


@pytest.mark.parametrize("replicas", [2, 3])
def test_two_and_three_replicas_receive_their_rows(replica_runs, replicas):
    """tests/replicas_worker.py fed row ids 0..17 in batches of 6 to N virtual CPUs."""
    import replicas_worker as worker
    run = replica_runs[replicas]
    b = worker.GLOBAL_BATCH // replicas
    for step in range(worker.ROWS_STEPS):
        for j in range(replicas):
            start = step * worker.GLOBAL_BATCH + j * b
            np.testing.assert_array_equal(run[f"rows_{step}_{j}"], np.arange(start, start + b))
            assert str(run[f"device_{step}_{j}"]).endswith(f"device:CPU:{j}")


def test_the_default_strategy_iterates_the_dataset_itself_and_bytes_are_counted():
    from engine.data.replicas import input_bytes, replica_batches, worker_batch_size
    ds = tf.data.Dataset.from_tensors((tf.zeros([8, 32, 32, 3]), tf.zeros([8, 5]))).repeat()
    assert replica_batches(ds, tf.distribute.get_strategy()) is ds  # no distribution machinery
    row = 32 * 32 * 3 * 4 + 5 * 4  # float32 pixels and labels of one example
    assert input_bytes(ds.element_spec, 2) == {"per_replica": 4 * row, "per_step": 8 * row,
                                               "old_per_step": 16 * row}
    with pytest.raises(ValueError, match="static size"):
        worker_batch_size(ds.unbatch().batch(8).element_spec)
