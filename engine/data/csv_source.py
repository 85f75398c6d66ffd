"""A folder of images with a labels CSV in Kaggle Planet format.

    data_dir/labels.csv (or train.csv)   header ``image_name,tags``; tags space-separated
    data_dir/val.csv                      optional, same format; else a hash split
    data_dir/images/ (or data_dir)        files named image_name, or image_name + .jpg/.jpeg/.png

Label names are the sorted set of all tags. Without val.csv, an image goes to
validation when a stable hash of its name falls below val_fraction, so the
split never depends on row order, on --seed or on the Python hash salt.
Every image is looked up here, at open time, so a typo fails before training.
"""

import csv
import hashlib
import os

import numpy as np

from engine.data.errors import DataError

HEADER = ["image_name", "tags"]
EXTENSIONS = (".jpg", ".jpeg", ".png")


def find_csv(data_dir):
    for name in ("labels.csv", "train.csv"):
        if os.path.isfile(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    return None


def images_folder(folder):
    """folder/images when it exists, else folder: where the files an image_name names live.

    --mode=predict resolves its CSV lists the same way, so a Planet test CSV
    next to its images/ works as it does for training.
    """
    images = os.path.join(folder, "images")
    return images if os.path.isdir(images) else folder


def find_image(image, files):
    """The file name image_name `image` means among `files`: as given, or + .jpg/.jpeg/.png (None)."""
    if not image:
        return None
    return next((c for c in (image, *(image + e for e in EXTENSIONS)) if c in files), None)


def _read_rows(path, image_dir, files, skipped=None):
    """[(resolved path, tags, image_name)] for one CSV, with one-line errors.

    skipped: a list to which a row naming no file is added (as its error
    line) instead of raising (--skip_bad_records).
    """
    name = os.path.basename(path)
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty; expected a header 'image_name,tags' and one row per image")
        if [h.strip().lower() for h in header] != HEADER:
            raise DataError(f"{name} line 1: header must be 'image_name,tags', got {','.join(header)!r}")
        for row in reader:
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise DataError(f"{name} line {reader.line_num}: expected 2 columns (image_name,tags), got {len(row)}")
            image = row[0].strip()
            found = find_image(image, files)
            if not image or found is None:
                message = f"{name} line {reader.line_num}: image {image!r} not found in {image_dir}"
                if skipped is None:
                    raise DataError(message)
                skipped.append(message)
                continue
            rows.append((os.path.join(image_dir, found), row[1].split(), image))
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    return rows


def in_val(image_name, val_fraction):
    h = int.from_bytes(hashlib.md5(image_name.encode()).digest()[:8], "big")
    return h / 2.0**64 < val_fraction


def read(data_dir, csv_path, val_fraction, skipped=None):
    """Return (label_names, (train_paths, train_multi_hot), (val_paths, val_multi_hot), text).

    skipped: see _read_rows.
    """
    image_dir = images_folder(data_dir)
    files = set(os.listdir(image_dir))
    rows = _read_rows(csv_path, image_dir, files, skipped)
    val_csv = os.path.join(data_dir, "val.csv")
    if os.path.isfile(val_csv):
        train, val, how = rows, _read_rows(val_csv, image_dir, files, skipped), "val.csv"
    else:
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"--val_fraction={val_fraction} must be in [0, 1)")
        train = [r for r in rows if not in_val(r[2], val_fraction)]
        val = [r for r in rows if in_val(r[2], val_fraction)]
        how = f"hash split {val_fraction:g}"
    names = sorted({t for r in train + val for t in r[1]})
    if not names:
        raise DataError(f"{csv_path} has no tags in any row; nothing to learn")
    if not train:
        raise DataError(f"{csv_path}: no training rows left after the validation split (--val_fraction={val_fraction})")
    index = {t: i for i, t in enumerate(names)}

    def arrays(rs):
        hot = np.zeros((len(rs), len(names)), np.float32)
        for i, r in enumerate(rs):
            hot[i, [index[t] for t in r[1]]] = 1.0
        return np.array([r[0] for r in rs], dtype=object), hot

    return names, arrays(train), arrays(val), f"{os.path.basename(csv_path)} + {image_dir} ({how})"
