"""--mode=predict: a submission whose probabilities are the eval pass's.

The run is written by hand (like tests/test_export.py): best/ckpt-5 with EMA
shadows whose logits sit 2 below the raw ones and vary 30x more across
images (an untrained head gives every image the same tags), so predicting
the raw weights by mistake would show.
"""
import csv
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from engine.config import Config, DataConfig, ModelConfig, PredictConfig, TrainConfig
from engine.data import DataError
from engine.data.decode import decode_for_eval
from engine.predict import predict

SIZE = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(model_dir, cache, **train):
    train = {"ema_decay": 0.9, **train}
    return Config(model=ModelConfig(backbone="tiny_cnn", input_size=SIZE),
                  data=DataConfig(cache_dir=cache),
                  train=TrainConfig(model_dir=str(model_dir), epochs=1, batch_size=16,
                                    steps_per_epoch=2, progress=False, **train))


def _predicting(config, source, output, **changes):
    groups = {"predict": {"input": str(source), "output": str(output),
                          "model": str(changes.pop("model", ""))}}
    for group, fields in (("train", "strategy num_virtual_cpus"), ("data", "skip_bad_records")):
        picked = {k: changes[k] for k in fields.split() if k in changes}
        if picked:
            groups[group] = picked
    return config.replace(**groups)


@pytest.fixture(scope="module")
def run(tmp_path_factory, embedded_cache):
    from engine.trainer import Trainer
    config = _config(tmp_path_factory.mktemp("predict_run"), embedded_cache)
    trainer = Trainer(config)
    trainer.restore()
    shadows = trainer.parts.ema.state()
    bias = next(k for k in shadows if k.endswith("logits/bias"))
    shadows[bias].assign(shadows[bias] - 2.0)
    kernel = next(k for k in shadows if k.endswith("logits/kernel"))
    shadows[kernel].assign(shadows[kernel] * 30.0)  # images differ enough to get other tags
    trainer.parts.counters.global_step.assign(5)
    trainer.parts.counters.best.assign(0.25)
    trainer.checkpointer.best.save(checkpoint_number=5)
    return config, trainer


@pytest.fixture(scope="module")
def eval_pass(run):
    """The trainer's own validation pass on the EMA weights: (probabilities, thresholds)."""
    config, trainer = run
    with trainer.parts.ema.swapped():
        probs = np.concatenate([
            trainer.parts.evaluation.eval_batch(images, labels)[0].numpy()
            for images, labels in trainer.parts.data.val_dataset(global_batch=16, input_size=SIZE)])
        trainer.parts.evaluation.run("check", save=False, report=False)
    return probs, trainer.parts.evaluation.thresholds["check"]


def _eval_on_files(trainer, paths):
    """Validation's decoding and the eval step on the EMA weights, for image files."""
    images = tf.stack([decode_for_eval(tf.io.read_file(str(p)), SIZE) for p in paths])
    with trainer.parts.ema.swapped():
        return trainer.parts.evaluation.eval_batch(images, tf.zeros([len(paths), 13]))[0].numpy()


def _read(output):
    """(names, tags, label names, probabilities) from the submission and its probabilities CSV."""
    with open(output, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_name", "tags"]
    with open(str(output)[:-4] + "_probabilities.csv", newline="") as f:
        probs = list(csv.reader(f))
    assert [r[0] for r in probs[1:]] == [r[0] for r in rows[1:]]
    return ([r[0] for r in rows[1:]], [r[1] for r in rows[1:]], probs[0][1:],
            np.array([[float(v) for v in r[1:]] for r in probs[1:]]))


def _tags(probs, thresholds, names):
    return [" ".join(n for n, on in zip(names, p >= thresholds) if on) for p in probs]


def _pngs(folder, count=5, seed=0):
    """PNG files of assorted sizes (resize matters), and one JPEG; returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        h, w = [(40, 48), (64, 64), (20, 24), (32, 32), (50, 30)][i % 5]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        encode = tf.io.encode_jpeg if i == count - 1 else tf.io.encode_png
        path = folder / f"test_{i}.{'jpg' if i == count - 1 else 'png'}"
        path.write_bytes(encode(pixels).numpy())
        paths.append(path)
    return paths


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_predictions_equal_the_eval_pass_on_the_validation_split(run, eval_pass, tmp_path,
                                                                 strategy):
    config, trainer = run
    val = os.path.join(config.data.cache_dir, "embedded_v1", "val-*.tfrecord*")
    output = tmp_path / "sub.csv"
    line = predict(_predicting(config, val, output, strategy=strategy,
                               num_virtual_cpus=2 if strategy == "mirrored" else 0))
    best = os.path.join(trainer.parts.model_dir, "best", "ckpt-5")
    assert line.startswith(f"predicted {trainer.parts.data.num_val} images of TFRecords ")
    assert f"with EMA weights of step 5 from {best} (best by --best_metric, 0.25)" in line
    assert f"tags -> {output}, probabilities -> {tmp_path}/sub_probabilities.csv" in line
    assert (" on 2 replicas" in line) == (strategy == "mirrored")
    names, tags, labels, probs = _read(output)
    want, thresholds = eval_pass
    assert labels == trainer.parts.data.label_names
    assert names == [f"val_{i:05d}" for i in range(trainer.parts.data.num_val)]
    np.testing.assert_allclose(probs, want, rtol=0, atol=1e-5)
    assert tags == _tags(want, thresholds, labels)
    assert any(tags) and len(set(tags)) > 1  # the comparison is not vacuous
    for path in (output, tmp_path / "sub_probabilities.csv"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["sub.csv", "sub_probabilities.csv"]  # no temp files


@pytest.fixture(scope="module")
def exported(run):
    """The run's default export (SavedModel dir): predicting from it is cheap (no val pass)."""
    from engine.export import export_saved_model
    config, trainer = run
    return export_saved_model(config).split(" to ", 1)[1].split(" (", 1)[0]


def test_a_folder_of_images(run, eval_pass, tmp_path):
    config, trainer = run
    paths = _pngs(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    line = predict(_predicting(config, tmp_path / "in", tmp_path / "a.csv"))
    assert line.startswith(f"predicted 5 images of folder {tmp_path}/in (5 listed) with EMA ")
    names, tags, labels, probs = _read(tmp_path / "a.csv")
    assert names == [f"test_{i}" for i in range(5)]
    want = _eval_on_files(trainer, paths)
    np.testing.assert_allclose(probs, want, rtol=0, atol=1e-5)
    assert tags == _tags(want, eval_pass[1], labels)


def test_an_exported_saved_model_predicts_the_same(run, eval_pass, exported, tmp_path):
    config, trainer = run
    paths = _pngs(tmp_path / "in", count=4, seed=1)
    line = predict(_predicting(config, tmp_path / "in", tmp_path / "s.csv", model=exported))
    assert line.startswith(f"predicted 4 images of folder {tmp_path}/in (4 listed) with EMA "
                           f"weights of step 5 from SavedModel {exported}; its thresholds ")
    names, tags, labels, probs = _read(tmp_path / "s.csv")
    want = _eval_on_files(trainer, paths)
    np.testing.assert_allclose(probs, want, rtol=0, atol=1e-5)
    served = tf.saved_model.load(exported).thresholds.numpy()
    np.testing.assert_allclose(served, eval_pass[1], rtol=0, atol=1e-6)
    assert tags == _tags(want, served, labels) and labels == trainer.parts.data.label_names


def test_a_planet_csv_list_and_a_text_list(run, exported, tmp_path):
    """Planet's test CSV: image_name without extension, the files in images/ next to it."""
    from engine.predict import open_inputs
    config, trainer = run
    paths = _pngs(tmp_path / "planet" / "images")
    (tmp_path / "planet" / "test.csv").write_text(
        "image_name,tags\n" + "".join(f"test_{i},\n" for i in (3, 0, 4)))
    predict(_predicting(config, tmp_path / "planet" / "test.csv", tmp_path / "b.csv",
                        model=exported))
    names, _, _, probs = _read(tmp_path / "b.csv")
    assert names == ["test_3", "test_0", "test_4"]
    want = _eval_on_files(trainer, [paths[i] for i in (3, 0, 4)])
    np.testing.assert_allclose(probs, want, rtol=0, atol=1e-5)
    (tmp_path / "list.txt").write_text(f"planet/images/test_1.png\n\n# a comment\n{paths[2]}\n")
    listed = open_inputs(str(tmp_path / "list.txt"))
    assert listed.count == 2 and listed.description == f"{tmp_path}/list.txt (2 listed)"
    got = [(w.numpy().decode(), n.numpy().decode()) for _, w, _, n in listed.elements]
    assert got == [(f"{tmp_path}/planet/images/test_1.png", "test_1"), (str(paths[2]), "test_2")]
    (tmp_path / "planet" / "missing.csv").write_text("image_name\ntest_0\nnope\n")
    with pytest.raises(DataError, match=r"missing\.csv line 3: image 'nope' not found in .*"
                                        r"planet/images \(--skip_bad_records leaves"):
        open_inputs(str(tmp_path / "planet" / "missing.csv"))


def test_a_bad_image_is_named_or_skipped_and_counted(run, exported, tmp_path):
    config, trainer = run
    _pngs(tmp_path / "in", count=3)
    (tmp_path / "in" / "test_1b.png").write_bytes(b"\x89PNG\r\n\x1a\n but cut short")
    (tmp_path / "in" / "z.jpg").write_text("not an image at all")
    output = tmp_path / "out" / "sub.csv"
    output.parent.mkdir()
    output.write_text("image_name,tags\nold,run\n")
    with pytest.raises(DataError, match=rf"^{tmp_path}/in/test_1b\.png: image does not decode "
                                        rf"\(.*\) \(--skip_bad_records leaves such images out\)$"):
        predict(_predicting(config, tmp_path / "in", output, model=exported))
    assert output.read_text() == "image_name,tags\nold,run\n"  # a failed run leaves it alone
    assert sorted(os.listdir(output.parent)) == ["sub.csv"]
    line = predict(_predicting(config, tmp_path / "in", output, model=exported,
                               skip_bad_records=True))
    assert line.startswith(f"predicted 3 images of folder {tmp_path}/in (5 listed) ")
    assert f"; skipped 2 bad images (--skip_bad_records): {tmp_path}/in/test_1b.png: image " \
           f"does not decode (" in line
    assert _read(output)[0] == ["test_0", "test_1", "test_2"]


def _cli(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_main.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_cli_trains_then_predicts_a_folder_through_the_flagfile(tmp_path, embedded_cache):
    """The README flow: a tiny run, then --mode=predict --flagfile=RUN/flags.txt."""
    from engine.data.tfrecord import file_records, parse_image
    from engine.trainer import Trainer
    run_dir = tmp_path / "run"
    trained = _cli(f"--model_dir={run_dir}", f"--cache_dir={embedded_cache}",
                   "--backbone=tiny_cnn", "--batch_size=16", "--steps_per_epoch=2", "--epochs=1",
                   "--progress=false")
    assert trained.returncode == 0, trained.stderr
    folder = tmp_path / "new"
    folder.mkdir()
    val = sorted(tf.io.gfile.glob(os.path.join(embedded_cache, "embedded_v1", "val-*")))
    for record in file_records(val).take(6):
        image_bytes, _, _, name = parse_image(*record)
        (folder / f"{name.numpy().decode()}.png").write_bytes(image_bytes.numpy())
    predicted = _cli("--mode=predict", f"--flagfile={run_dir}/flags.txt",
                     f"--predict_input={folder}", f"--predict_output={tmp_path}/out.csv")
    assert predicted.returncode == 0, predicted.stderr
    line = predicted.stdout.strip().splitlines()[-1]
    assert line.startswith(f"predicted 6 images of folder {folder} (6 listed) with raw weights "
                           f"of step 2 from {run_dir}/best/ckpt-2 "), line
    assert "predict_input" not in (run_dir / "flags.txt").read_text()
    # An eval of the same images: the trainer's validation pass, its thresholds.
    trainer = Trainer(_config(run_dir, embedded_cache, ema_decay=0.0))
    trainer.restore()
    images, labels = next(iter(trainer.parts.data.val_dataset(global_batch=6, input_size=SIZE)))
    probs = trainer.parts.evaluation.eval_batch(images, labels)[0].numpy()
    trainer.parts.evaluation.run("check", save=False, report=False)
    names, tags, label_names, got = _read(tmp_path / "out.csv")
    assert names == [f"val_{i:05d}" for i in range(6)]
    np.testing.assert_allclose(got, probs, rtol=0, atol=1e-5)
    assert tags == _tags(probs, trainer.parts.evaluation.thresholds["check"], label_names)


def test_segmentation_writes_one_class_id_png_per_image(tmp_path, embedded_cache):
    """A segmentation SavedModel (a tiny U-Net, exported by hand): masks next to the output."""
    from engine.export import SIGNATURE, METADATA_SIGNATURE, ServingModule
    from models import build_model
    model = build_model("tiny_cnn", SIZE, 4, task="segmentation", unet_depth=2, unet_filters=4,
                        seed=1)
    module = ServingModule(model, SIZE, multiclass=True, label_names=["bg", "a", "b", "c"],
                           weights="raw", step=3)
    tf.saved_model.save(module, str(tmp_path / "seg"), signatures={
        SIGNATURE: module.serve, METADATA_SIGNATURE: module.metadata})
    paths = _pngs(tmp_path / "in", count=3)
    config = _config(tmp_path / "unused", embedded_cache)
    line = predict(_predicting(config, tmp_path / "in", tmp_path / "seg.csv",
                               model=tmp_path / "seg"))
    masks = tmp_path / "seg_masks"
    assert line.startswith(f"predicted 3 images of folder {tmp_path}/in (3 listed) with raw "
                           f"weights of step 3 from SavedModel {tmp_path}/seg: masks -> "
                           f"{masks}/ (class ids, uint8 PNG, 32x32), index -> {tmp_path}/seg.csv")
    with open(tmp_path / "seg.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["image_name", "mask"]] + [[f"test_{i}", f"seg_masks/test_{i}.png"]
                                               for i in range(3)]
    images = tf.stack([decode_for_eval(tf.io.read_file(str(p)), SIZE) for p in paths])
    want = tf.argmax(model(images, training=False), axis=-1).numpy()
    for i in range(3):
        mask = tf.io.decode_png((masks / f"test_{i}.png").read_bytes()).numpy()
        assert mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE, 1)
        np.testing.assert_array_equal(mask[..., 0], want[i])
        assert stat.S_IMODE(os.stat(masks / f"test_{i}.png").st_mode) == 0o644
