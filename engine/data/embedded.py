"""The embedded dataset: synthetic multi-label images so a fresh machine can train.

It is imbalanced the way real multi-label data is (two labels on ~90% of
images, nine under 10%), so the engine's metrics and losses meet the same
problem users bring. Each label is its own visual cue (a colour band, or a
shape with its own colour in one cell of a 4x4 grid, or a frame), learnable
by a small CNN; random placement, size, colour jitter and pixel noise keep it
from being trivial. Labels are independent across images, and each label is
on exactly round(p * n) images of each split, so measured prevalence is p.

The generator seed is fixed (not --seed): every run and every machine share
one dataset, and the stored copy is ``cache_dir/embedded_v1/``. Bump the
version in DIRNAME whenever the generator changes.
"""

import json
import os
import shutil
import tempfile

import numpy as np

from engine.data.tfrecord import write_tfrecords

DIRNAME = "embedded_v1"
GENERATOR_SEED = 20240611
SIZE = 64
NUM_TRAIN, NUM_VAL = 2048, 512
TRAIN_SHARDS, VAL_SHARDS = 4, 1

LABELS = [  # (name, prevalence)
    ("green_field", 0.90), ("sky_band", 0.90), ("red_disc", 0.30), ("blue_square", 0.20),
    ("yellow_triangle", 0.09), ("white_stripes", 0.08), ("magenta_cross", 0.07),
    ("cyan_dots", 0.06), ("orange_ring", 0.05), ("black_border", 0.05),
    ("noise_patch", 0.04), ("purple_diamond", 0.03), ("checkerboard", 0.03),
]
LABEL_NAMES = [n for n, _ in LABELS]
PREVALENCE = np.array([p for _, p in LABELS])

_COLOURS = {2: (220, 30, 30), 3: (30, 60, 220), 4: (240, 220, 30), 5: (245, 245, 245),
            6: (220, 40, 220), 7: (40, 220, 220), 8: (250, 140, 20), 11: (120, 40, 160)}


def _mask(label, s):
    """Boolean s x s mask of the shape for an object label."""
    y, x = np.mgrid[:s, :s] + 0.5
    c, r = s / 2.0, s / 2.0
    if label == 2:
        return (x - c) ** 2 + (y - c) ** 2 <= r * r
    if label == 3:
        return np.ones((s, s), bool)
    if label == 4:
        return np.abs(x - c) <= y / 2.0
    if label == 5:
        return (np.floor(y) % 4) < 2
    if label == 6:
        return (np.abs(x - c) <= 1.6) | (np.abs(y - c) <= 1.6)
    if label == 7:
        return ((np.floor(x) % 5) < 2) & ((np.floor(y) % 5) < 2)
    if label == 8:
        d = (x - c) ** 2 + (y - c) ** 2
        return (d <= r * r) & (d >= (r - 2.5) ** 2)
    if label == 11:
        return np.abs(x - c) + np.abs(y - c) <= r
    raise ValueError(label)


def _draw(img, labels, rng):
    """Paint one image in place (float32 HxWx3) for the set of positive labels."""
    img[:] = rng.uniform([100, 90, 70], [170, 150, 130])  # neutral, warm: never sky or grass
    if 1 in labels:
        h = rng.integers(12, 22)
        img[:h] = np.array([135, 190, 235]) + rng.uniform(-20, 20, 3)
    if 0 in labels:
        h = rng.integers(12, 22)
        img[SIZE - h:] = np.array([60, 150, 60]) + rng.uniform(-20, 20, 3) + rng.normal(0, 12, (h, SIZE, 1))
    objects = [l for l in sorted(labels) if l >= 2 and l != 9]
    for label, cell in zip(objects, rng.permutation(16)):
        s = int(rng.integers(8, 13))
        y0 = (cell // 4) * 16 + int(rng.integers(2, 16 - s - 1))
        x0 = (cell % 4) * 16 + int(rng.integers(2, 16 - s - 1))
        patch = img[y0:y0 + s, x0:x0 + s]
        if label == 10:
            patch[:] = rng.uniform(0, 255, (s, s, 3))
        elif label == 12:
            y, x = np.mgrid[:s, :s]
            patch[:] = np.where((((y // 2) + (x // 2)) % 2 == 0)[..., None], 240.0, 15.0)
        else:
            patch[_mask(label, s)] = np.array(_COLOURS[label]) + rng.uniform(-20, 20, 3)
    if 9 in labels:
        for sl in (np.s_[:2], np.s_[-2:], np.s_[:, :2], np.s_[:, -2:]):
            img[sl] = 10.0
    img += rng.normal(0, 6, img.shape)


def generate(n, rng):
    """(uint8 [n,64,64,3], list of label index lists) with exact per-label counts."""
    on = np.zeros((n, len(LABELS)), bool)
    for j, p in enumerate(PREVALENCE):
        on[rng.choice(n, int(round(p * n)), replace=False), j] = True
    images = np.empty((n, SIZE, SIZE, 3), np.float32)
    label_lists = [np.flatnonzero(row).tolist() for row in on]
    for i in range(n):
        _draw(images[i], set(label_lists[i]), rng)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), label_lists


def ensure(cache_dir, num_train=NUM_TRAIN, num_val=NUM_VAL):
    """Return the dataset directory, creating it atomically on first use.

    num_train, num_val: the split sizes to generate (the stored set has the
    defaults; a smaller set builds in a moment for a tool or a test).
    """
    def fill(directory):
        rng = np.random.default_rng(GENERATOR_SEED)
        meta = {"version": 1, "generator_seed": GENERATOR_SEED, "image_size": SIZE,
                "label_names": LABEL_NAMES}
        for split, n, shards in (("train", num_train, TRAIN_SHARDS), ("val", num_val, VAL_SHARDS)):
            images, labels = generate(n, rng)
            write_tfrecords(os.path.join(directory, split), images, labels,
                            names=[f"{split}_{i:05d}" for i in range(n)], num_shards=shards)
            hot = np.zeros((n, len(LABELS)))
            for i, l in enumerate(labels):
                hot[i, l] = 1
            meta[f"num_{split}"] = n
            meta[f"{split}_prevalence"] = [round(float(p), 4) for p in hot.mean(0)]
        return meta

    return build_once(cache_dir, DIRNAME, fill, LABEL_NAMES)


def build_once(cache_dir, dirname, fill, names) -> str:
    """cache_dir/dirname, made on first use by fill(directory) -> meta, plus labels.txt (names)
    and meta.json, the mark of a complete set.

    Two processes may race here: each fills its own temp dir inside cache_dir
    and renames it into place; the loser deletes its copy and uses the
    winner's. The final directory therefore only ever exists complete.
    """
    final = os.path.join(cache_dir, dirname)
    if os.path.isfile(os.path.join(final, "meta.json")):
        return final
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{dirname}.tmp-", dir=cache_dir)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        meta = fill(tmp)
        with open(os.path.join(tmp, "labels.txt"), "w") as fh:
            fh.write("\n".join(names) + "\n")
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
