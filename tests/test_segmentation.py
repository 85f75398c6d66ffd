"""Segmentation: U-Net / DeepLabV3+ models, the seg data sources, the seg eval step, training."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from engine import distribute
from engine import flags as engine_flags
from engine import freeze
from engine.config import (Config, ConfigError, DataConfig, FreezeConfig, LossConfig, ModelConfig,
                           OptimizerConfig, TrainConfig)
from engine.data import DataError, open_data
from engine.data import segmentation as seg
from engine.losses import make_loss
from engine.steps import make_segmentation_eval_batch
from engine.trainer import Trainer
from models import ModelError, backbone_blocks, build_model


def _seg_model(arch, size=32, classes=4, **kw):
    return build_model("tiny_cnn", size, classes, task="segmentation", seg_model=arch, seed=0, **kw)


# ------------------------------------------------------------------ models
@pytest.mark.parametrize("arch", ["unet", "deeplabv3plus"])
def test_models_give_pixel_logits_with_addressable_backbone_and_head(arch):
    model = _seg_model(arch, unet_depth=3, unet_filters=4)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    y = model(x, training=False)
    assert tuple(y.shape) == (2, 32, 32, 4) and y.dtype == "float32"
    backbone, head = model.get_layer("backbone"), model.get_layer("head")
    assert isinstance(backbone, keras.Model) and isinstance(head, keras.Model)
    assert [l.name for l in model.layers] == ["image", "preprocess", "backbone", "head"]
    for part in (backbone, head):  # BatchNorm in encoder and decoder
        assert any(isinstance(l, keras.layers.BatchNormalization) for l in part.layers)
    assert head.get_layer("logits").activation is keras.activations.linear
    blocks = backbone_blocks(backbone, arch)
    names = [n for b in blocks for n in b]
    assert sorted(names) == sorted(l.name for l in backbone.layers)  # each layer once
    if arch == "unet":
        assert len(blocks) == 4 and [len(o.shape) for o in backbone.outputs] == [4] * 4
        assert backbone.get_layer("block1_1_conv").filters == 4
        assert backbone.get_layer("block4_2_conv").filters == 32
    else:
        assert blocks[0][-1] == "Conv1_relu" and blocks[-1][0] == "block_13_expand"
        assert [tuple(o.shape[1:3]) for o in backbone.outputs] == [(8, 8), (2, 2)]
    # freeze / unfreeze by name, as for the classifiers
    freeze.apply_phase(model, freeze.FROZEN, thawed=names, freeze_bn=False)
    assert not backbone.trainable_variables and head.trainable_variables
    freeze.apply_phase(model, freeze.UNFROZEN, thawed=blocks[-1], freeze_bn=False)
    trainable = {v.path for v in backbone.trainable_variables}
    assert trainable and all(any(f"/{n}/" in p or p.startswith(f"{n}/") for n in blocks[-1])
                             for p in trainable)


def test_model_and_config_errors_name_the_flag():
    with pytest.raises(ModelError, match="^--seg_model=fcn "):
        _seg_model("fcn")
    with pytest.raises(ModelError, match="--unet_depth=3"):
        _seg_model("unet", size=36, unet_depth=3)
    with pytest.raises(ModelError, match="^--input_size=40 must be a multiple of 16"):
        _seg_model("deeplabv3plus", size=40)
    with pytest.raises(ModelError, match="at least 2 classes"):
        _seg_model("unet", classes=1)
    with pytest.raises(ConfigError, match="^--input_size=48 must be a multiple of 32 for --seg_model=unet"):
        Config(model=ModelConfig(task="segmentation", input_size=48, unet_depth=5)).validated()
    with pytest.raises(ConfigError, match="^--seg_model=fcn"):
        Config(model=ModelConfig(task="segmentation", seg_model="fcn")).validated()


def test_flags_default_the_loss_and_size_for_segmentation():
    f = flags.FLAGS
    try:
        f.unparse_flags()
        f(["train_main.py", "--task=segmentation", "--unet_depth=3", "--unet_filters=8"])
        c = engine_flags.config_from_flags(f)
        assert (c.loss.loss, c.model.input_size, c.model.unet_depth, c.model.unet_filters) == \
               ("ce", 64, 3, 8)
        f.unparse_flags()
        f(["train_main.py", "--task=segmentation", "--loss=ce+lovasz", "--seg_model=deeplabv3plus"])
        c = engine_flags.config_from_flags(f)
        assert c.loss.loss == "ce+lovasz" and c.model.seg_model == "deeplabv3plus"
    finally:
        f.unparse_flags()


# -------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    return open_data(None, str(tmp_path_factory.mktemp("segcache")), task="segmentation")


def test_embedded_set_reads_back_with_the_stated_class_balance(seg_data):
    data = seg_data
    assert data.label_names == ["background", "disc", "square", "triangle"]
    assert (data.num_train, data.num_val) == (seg.NUM_TRAIN, seg.NUM_VAL)
    counts = np.zeros(4, np.int64)
    for images, masks in data.val_dataset(global_batch=64, input_size=64):
        assert images.dtype == tf.float32 and tuple(images.shape[1:]) == (64, 64, 3)
        assert masks.dtype == tf.int32 and tuple(masks.shape[1:]) == (64, 64)
        counts += np.bincount(masks.numpy().reshape(-1), minlength=4)
    share = counts / counts.sum()
    with open(os.path.join(os.path.dirname(data.files["val"][0]), "meta.json")) as f:
        meta = json.load(f)
    np.testing.assert_allclose(share, meta["val_class_share"], atol=1e-3)  # read back = written
    stated = np.array([p for _, p in seg.CLASSES])
    np.testing.assert_allclose(share, stated, atol=0.02)
    np.testing.assert_allclose(data.label_prevalence, stated, atol=0.02)  # train shares
    assert 0.65 < share[0] < 0.8 and share[1] > share[2] > share[3] > 0.02
    assert data.majority_class == 0


def test_flip_moves_image_and_mask_together(seg_data):
    kw = dict(epoch=0, global_batch=16, input_size=32, seed=3)
    plain = next(iter(seg_data.train_dataset(augment=False, **kw)))
    flipped = next(iter(seg_data.train_dataset(augment=True, **kw)))
    n_flipped = 0
    for i in range(16):
        img, mask = flipped[0][i].numpy(), flipped[1][i].numpy()
        if np.array_equal(img, plain[0][i].numpy()):
            assert np.array_equal(mask, plain[1][i].numpy())
        else:
            n_flipped += 1
            np.testing.assert_array_equal(img, plain[0][i].numpy()[:, ::-1])
            np.testing.assert_array_equal(mask, plain[1][i].numpy()[:, ::-1])
    assert 0 < n_flipped < 16


def _write_folder(root, n=24, size=16, mask_value=None, mask_channels=1):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = (rng.integers(0, 3, (size, size, 1)) if mask_value is None
                else np.full((size, size, 1), mask_value)).astype(np.uint8)
        tf.io.write_file(str(root / "images" / f"im{i:02d}.jpg"),
                         tf.io.encode_jpeg(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)))
        tf.io.write_file(str(root / "masks" / f"im{i:02d}.png"),
                         tf.io.encode_png(np.repeat(mask, mask_channels, axis=-1)))


def test_user_folder_and_tfrecords_of_images_and_masks(tmp_path):
    _write_folder(tmp_path / "f", n=30)
    data = open_data(str(tmp_path / "f"), str(tmp_path / "cache"), task="segmentation",
                     val_fraction=0.3)
    assert data.label_names == ["class_0", "class_1", "class_2"]
    assert data.num_train + data.num_val == 30 and data.num_val > 0
    np.testing.assert_allclose(data.label_prevalence, 1 / 3, atol=0.05)
    images, masks = next(iter(data.val_dataset(global_batch=4, input_size=32)))
    assert tuple(images.shape[1:]) == (32, 32, 3) and tuple(masks.shape[1:]) == (32, 32)
    assert set(np.unique(masks.numpy())) <= {0, 1, 2}

    rng = np.random.default_rng(1)
    ims = rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    mks = rng.integers(0, 2, (6, 16, 16), dtype=np.uint8)
    rec = tmp_path / "rec"
    seg.write_seg_tfrecords(str(rec / "train"), ims[:4], mks[:4])
    seg.write_seg_tfrecords(str(rec / "val"), ims[4:], mks[4:])
    (rec / "labels.txt").write_text("bg\nthing\n")
    data = open_data(str(rec), str(tmp_path / "cache"), task="segmentation")
    assert (data.num_train, data.num_val, data.label_names) == (4, 2, ["bg", "thing"])
    images, masks = next(iter(data.val_dataset(global_batch=2, input_size=16)))
    np.testing.assert_array_equal(masks.numpy(), mks[4:])
    np.testing.assert_array_equal(images.numpy(), ims[4:].astype(np.float32))


def test_bad_masks_are_named_at_open(tmp_path):
    _write_folder(tmp_path / "ids", n=12, mask_value=5)
    (tmp_path / "ids" / "labels.txt").write_text("bg\na\nb\n")
    with pytest.raises(DataError, match="class id 5 but there are 3 classes"):
        open_data(str(tmp_path / "ids"), "", task="segmentation", val_fraction=0.5)
    _write_folder(tmp_path / "rgb", n=12, mask_channels=3)
    with pytest.raises(DataError, match=r"im\d\d\.png: mask has 3 channels"):
        open_data(str(tmp_path / "rgb"), "", task="segmentation", val_fraction=0.5)
    (tmp_path / "nomask" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="no masks/ folder"):
        open_data(str(tmp_path / "nomask"), "", task="segmentation")


# ---------------------------------------------------------- eval step
def test_seg_eval_batch_pads_a_short_batch_over_two_replicas():
    # engine's helper: fresh collective keys (a strategy made directly can collide with the
    # all-reduces of another test's strategy in the same process; engine/distribute.py)
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = _seg_model("unet", size=16, classes=3, unet_depth=2, unet_filters=4)
    loss = make_loss("ce", num_labels=3, task="segmentation")
    ev = make_segmentation_eval_batch(model=model, loss_fn=loss, strategy=strategy,
                                      local_replicas=2, input_size=16, num_classes=3)
    x = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, (3, 16, 16)).astype("int32")
    ids, per_example, stats = ev(x, y)
    logits = model(x, training=False).numpy()
    np.testing.assert_array_equal(ids.numpy(), logits.argmax(-1))
    np.testing.assert_allclose(per_example.numpy(), loss(y, logits).numpy(), rtol=1e-5)
    assert tuple(stats.shape) == (3, 2, 3)
    np.testing.assert_allclose(stats.numpy()[:, 0].sum(-1), 256.0, rtol=1e-5)  # probs sum to 1


# ------------------------------------------------------------ training
def _config(tmp_path, cache, loss="ce", **train):
    t = dict(model_dir=str(tmp_path / "run"), epochs=2, batch_size=16, steps_per_epoch=15,
             steps_per_loop=5, progress=False)
    t.update(train)
    return Config(model=ModelConfig(task="segmentation", input_size=32, unet_depth=2,
                                    unet_filters=8),
                  data=DataConfig(cache_dir=cache), loss=LossConfig(loss=loss),
                  freeze=FreezeConfig(unfreeze_at=0),
                  optimizer=OptimizerConfig(name="adam", learning_rate=0.005, schedule="constant"),
                  train=TrainConfig(**t))


@pytest.fixture(scope="module")
def seg_cache(seg_data):
    return os.path.dirname(os.path.dirname(seg_data.files["val"][0]))


def test_tiny_unet_run_beats_the_majority_class(tmp_path, seg_cache, capsys):
    trainer = Trainer(_config(tmp_path, seg_cache))
    result = trainer.train()
    out = capsys.readouterr().out
    baseline = trainer.parts.evaluation.baseline()
    assert {k for k in result if k.startswith("val")} == {"val_loss", "val_mean_iou",
                                                        "val_pixel_accuracy"}
    assert baseline["baseline_mean_iou"] < 0.2  # background only: ~0.72 / 4
    assert result["val_mean_iou"] > baseline["baseline_mean_iou"] + 0.15
    scalars = trainer.parts.evaluation.label_scalars()
    assert set(scalars) == {f"val_iou/{n}" for n in trainer.parts.data.label_names}
    assert np.isclose(np.mean(list(scalars.values())), result["val_mean_iou"])
    assert out.count("val per class (pixel shares") == 2 and "baseline_mean_iou=" in out
    assert int(trainer.parts.counters.epoch.numpy()) == 2


@pytest.mark.parametrize("loss", ["dice", "ce+lovasz"])
def test_other_seg_losses_run_end_to_end(tmp_path, seg_cache, loss):
    trainer = Trainer(_config(tmp_path, seg_cache, loss=loss, epochs=1, steps_per_epoch=4,
                              steps_per_loop=4))
    result = trainer.train()
    assert np.isfinite(result["loss"]) and 0.0 <= result["val_mean_iou"] <= 1.0


def test_constant_seg_head_is_reported_as_collapsed(tmp_path, seg_cache):
    trainer = Trainer(_config(tmp_path, seg_cache, epochs=1))
    logits = trainer.parts.model.get_layer("head").get_layer("logits")
    logits.kernel.assign(np.zeros(logits.kernel.shape, np.float32))
    logits.bias.assign(np.array([3.0, 0.0, 0.0, 0.0], np.float32))
    trainer.evaluate()
    warnings = trainer.parts.evaluation.warnings
    assert sum("barely vary" in w and w.startswith("val: class '") for w in warnings) == 4
    assert any("100.0% of pixels are predicted as 'background'" in w for w in warnings)
    assert all("--loss=ce+lovasz" in w for w in warnings)


def test_decoded_cache_flips_image_and_mask_exactly_like_decoding(seg_data):
    batches = {}
    for cached in (False, True):
        seg_data.decoded_cache_bytes = (1 << 30) if cached else 0
        seg_data.drop_decoded_cache()
        batches[cached] = [(x.numpy(), m.numpy()) for x, m in seg_data.train_dataset(
            epoch=1, global_batch=16, input_size=32, seed=5, skip_batches=2)]
    assert seg_data.cached_input_sizes == (32,) and len(batches[True]) == len(batches[False]) > 0
    for (xa, ma), (xb, mb) in zip(batches[False], batches[True]):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ma, mb)


def test_decoded_cache_budget_counts_the_masks_too(seg_data):
    per_example = 32 * 32 * 3 * 4 + 32 * 32 * 4  # float32 image + int32 mask
    assert seg_data.decoded_example_bytes(32) == per_example
    seg_data.drop_decoded_cache()
    seg_data.decoded_cache_bytes = seg_data.num_train * per_example - 1  # images alone would fit
    next(iter(seg_data.train_dataset(epoch=0, global_batch=16, input_size=32, seed=0)))
    assert seg_data.cached_input_sizes == ()
