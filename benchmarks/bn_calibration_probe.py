"""How many calibration batches a random backbone needs (the --calibrate_bn_steps default).

    python benchmarks/bn_calibration_probe.py --backbone=inceptionv3 --steps=0,4,16,32,64,128,256

For each N (cumulative: the statistics after N batches do not depend on the
ones before, since calibration runs BN at momentum 0 and averages), it
reports the seconds the calibration took, how far the moving statistics are
from those of the largest N (median relative error of the variances over
all BN layers), the spread of the pooled features across validation images,
and a linear probe's val macro AUC (ridge regression on standardised
pooled features, per label, the best of a few penalties on val: an upper
bound of what a frozen phase's linear head can reach on those features).
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

flags.DEFINE_string("backbone", "inceptionv3", "Backbone.")
flags.DEFINE_integer("input_size", 75, "Input size.")
flags.DEFINE_integer("batch_size", 32, "Calibration batch size.")
flags.DEFINE_list("steps", ["0", "4", "16", "32", "64", "128", "256"], "Values of N.")
flags.DEFINE_float("bn_momentum", 0.9, "Model BN momentum (irrelevant to calibration).")
flags.DEFINE_string("cache_dir", "/tmp/twcache", "Embedded dataset cache.")
flags.DEFINE_integer("seed", 0, "Seed.")
FLAGS = flags.FLAGS


def _auc(scores, labels):
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels > 0.5
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _probe(train_x, train_y, val_x, val_y):
    mean, std = train_x.mean(0), train_x.std(0) + 1e-8
    a, b = (train_x - mean) / std, (val_x - mean) / std
    gram = a.T @ a
    best = 0.0
    for lam in (1.0, 10.0, 100.0, 1000.0):
        w = np.linalg.solve(gram + lam * len(a) * np.eye(len(gram)) / 100, a.T @ (2 * train_y - 1))
        scores = b @ w
        best = max(best, float(np.mean([_auc(scores[:, j], val_y[:, j])
                                        for j in range(val_y.shape[1])])))
    return best


def _features(backbone, preprocess, dataset):
    xs, ys = [], []
    for images, labels in dataset:
        xs.append(backbone(preprocess(images), training=False).numpy())
        ys.append(labels.numpy())
    return np.concatenate(xs).astype(np.float64), np.concatenate(ys)


def main(_):
    from engine.calibration import BNCalibrator, training_batches
    from engine.data import open_data
    from models import build_model

    data = open_data(None, FLAGS.cache_dir, seed=FLAGS.seed)
    model = build_model(FLAGS.backbone, FLAGS.input_size, data.num_labels, seed=FLAGS.seed,
                        bn_momentum=FLAGS.bn_momentum)
    backbone = model.get_layer("backbone")
    preprocess = model.layers[1]
    calibrator = BNCalibrator(model)
    args = dict(global_batch=FLAGS.batch_size, input_size=FLAGS.input_size, seed=FLAGS.seed,
                augment=True)
    steps = sorted(int(s) for s in FLAGS.steps)
    results = {}
    for n in steps:
        t0 = time.perf_counter()
        calibrator(training_batches(data, steps=n, **args), n)
        seconds = time.perf_counter() - t0
        variances = [np.array(layer.moving_variance.numpy()) for layer in calibrator.layers]
        train = _features(backbone, preprocess,
                          training_batches(data, steps=data.num_train // 32, global_batch=32,
                                           input_size=FLAGS.input_size, seed=FLAGS.seed,
                                           augment=False))
        val = _features(backbone, preprocess,
                        data.val_dataset(global_batch=64, input_size=FLAGS.input_size))
        results[n] = (seconds, variances, float(np.mean(val[0].std(0))),
                      float(np.mean(np.abs(val[0]))), _probe(*train, *val))
        print(f"N={n}: {seconds:.1f} s, probe AUC {results[n][4]:.3f}", flush=True)
    ref = results[steps[-1]][1]
    print("| N | seconds | median rel. error of variances vs N=%d | feature spread (std / mean abs) "
          "| linear probe val macro AUC |" % steps[-1])
    print("|---|---|---|---|---|")
    for n in steps:
        seconds, variances, spread, size, auc = results[n]
        err = np.median(np.concatenate([np.abs(v - r) / (np.abs(r) + 1e-12)
                                        for v, r in zip(variances, ref)]))
        print(f"| {n} | {seconds:.1f} | {err:.3f} | {spread:.3g} / {size:.3g} | {auc:.3f} |")


if __name__ == "__main__":
    app.run(main)
