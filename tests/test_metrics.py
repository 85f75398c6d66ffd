"""engine.metrics: hand-computed values, streaming == one-shot, threshold search."""

import itertools
import json
import math
import os
import stat

import numpy as np
import pytest

from engine.metrics import (ConfusionMatrixIoU, MultiClassEvaluator, MultiLabelEvaluator,
                            ThresholdFileError, load_thresholds, read_thresholds, save_thresholds,
                            thresholds_path_for)

# 3 images x 3 labels, worked by hand below
LABELS = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
PROBS = np.array([[0.9, 0.6, 0.2], [0.1, 0.7, 0.4], [0.3, 0.8, 0.55]], np.float32)


def evaluator(**kw):
    ev = MultiLabelEvaluator(3, beta=2.0, label_names=["a", "b", "c"], **kw)
    ev.update(LABELS, PROBS)
    return ev


def test_f2_hand_computed_at_0_5():
    r = evaluator().result()
    # decisions at 0.5: [1,1,0], [0,1,0], [0,1,1]
    # per image: (tp, fp, fn) = (1,1,1), (1,0,0), (1,1,1); F2 = 5tp / (5tp + 4fn + fp)
    assert r["f2_samples_at_0.5"] == pytest.approx((5 / 10 + 1 + 5 / 10) / 3)
    # per label: a (1,0,1) -> 5/9; b (2,1,0) -> 10/11; c (0,1,1) -> 0
    assert r["f2_macro_at_0.5"] == pytest.approx((5 / 9 + 10 / 11 + 0) / 3)
    assert r["f2_at_0.5/b"] == pytest.approx(10 / 11)
    # micro: tp 3, fp 2, fn 2 -> 15 / 25
    assert r["f2_micro_at_0.5"] == pytest.approx(0.6)
    assert r["precision_at_0.5/b"] == pytest.approx(2 / 3)
    assert r["recall_at_0.5/b"] == 1.0
    assert r["recall_at_0.5/a"] == 0.5
    assert r["num_examples"] == 3.0
    assert "f2_samples" not in r
    assert all(isinstance(v, float) for v in r.values())


def test_f2_hand_computed_at_thresholds():
    r = evaluator().result(thresholds=[0.25, 0.75, 0.5])
    # decisions: [1,0,0], [0,0,0], [1,1,1]
    # per image: (1,0,1) -> 5/9; (0,0,1) -> 0; (2,1,0) -> 10/11
    assert r["f2_samples"] == pytest.approx((5 / 9 + 0 + 10 / 11) / 3)
    # per label: a (2,0,0) -> 1; b (1,0,1) -> 5/9; c (0,1,1) -> 0
    assert r["f2_macro"] == pytest.approx((1 + 5 / 9 + 0) / 3)
    # micro: tp 3, fp 1, fn 2 -> 15 / (15 + 8 + 1)
    assert r["f2_micro"] == pytest.approx(15 / 24)
    assert r["f2_samples_at_0.5"] == pytest.approx(2 / 3)   # unchanged


def test_beta_in_key_names():
    ev = MultiLabelEvaluator(3, beta=0.5)
    ev.update(LABELS, PROBS)
    assert "f0.5_micro_at_0.5" in ev.result()


def test_zero_division_for_label_never_present_nor_predicted():
    ev = MultiLabelEvaluator(2, label_names=["x", "y"])
    ev.update([[1, 0], [1, 0], [0, 0]], [[0.9, 0.1], [0.8, 0.2], [0.3, 0.3]])
    r = ev.result()
    assert r["f2_at_0.5/y"] == 1.0 and r["f2_samples_at_0.5"] == 1.0
    assert math.isnan(r["auc/y"])                     # no positives: AUC undefined
    assert r["macro_auc"] == r["auc/x"] == 1.0        # ... and left out of the mean
    # the search must not predict y everywhere: only a threshold above 0.3 keeps F = 1
    assert ev.search_thresholds("macro")[1] > 0.3


def exact_auc(y, p):
    pos, neg = p[y == 1], p[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auc_from_histograms_matches_pairwise():
    rng = np.random.default_rng(3)
    n = 60
    # probabilities at bin centres: AUC from bins is exact, ties included
    probs = (rng.integers(0, 200, size=(n, 2)) + 0.5) / 200
    labels = (rng.random((n, 2)) < probs).astype(int)
    ev = MultiLabelEvaluator(2)
    ev.update(labels, probs)
    auc = ev.auc()
    for j in range(2):
        assert auc[j] == pytest.approx(exact_auc(labels[:, j], probs[:, j].astype(np.float32)))


def random_data(seed, n=97, num_labels=5):
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.9, 0.85, 0.2, 0.05, 0.3])[:num_labels]
    labels = (rng.random((n, num_labels)) < prevalence).astype(np.int64)
    logits = rng.normal(size=(n, num_labels)) + 1.5 * (2 * labels - 1)
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    probs[0, 0], probs[1, 1], probs[2, 2] = 0.0, 1.0, 0.5      # edges of the grid
    return labels, probs


def assert_same_results(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == b[key], key


def test_streaming_equals_one_shot():
    labels, probs = random_data(0)
    one = MultiLabelEvaluator(5)
    one.update(labels, probs)
    streamed = MultiLabelEvaluator(5)
    start = 0
    for size in (1, 10, 0, 30, 56):
        streamed.update(labels[start:start + size], probs[start:start + size])
        start += size
    assert start == len(labels)
    for objective in ("samples", "macro"):
        t_one, t_streamed = one.search_thresholds(objective), streamed.search_thresholds(objective)
        np.testing.assert_array_equal(t_one, t_streamed)
        assert_same_results(one.result(t_one), streamed.result(t_streamed))
    for x, y in zip(one.prediction_stats(), streamed.prediction_stats()):
        np.testing.assert_allclose(x, y, rtol=1e-12)


def test_macro_search_finds_the_separating_threshold():
    ev = MultiLabelEvaluator(1, num_bins=100)
    ev.update([[0], [0], [0], [1], [1], [1]], [[0.1], [0.3], [0.55], [0.62], [0.71], [0.8]])
    (t,) = ev.search_thresholds("macro")
    # every threshold in (0.55, 0.62] separates perfectly; the middle of the
    # grid run 0.56..0.62 is taken
    assert t == pytest.approx(0.59)
    assert ev.result([t])["f2_macro"] == 1.0
    (t,) = ev.search_thresholds("samples")
    assert 0.55 < t <= 0.62


def test_macro_search_prefers_recall_for_f2():
    # one positive at 0.2 hidden among negatives at 0.3 and 0.4: F2 rewards
    # recall, so taking all three (t <= 0.2: tp 1, fp 2 -> 5/7) beats taking
    # none (F = 0) -- a hand-checkable optimum far below 0.5
    ev = MultiLabelEvaluator(1, num_bins=10)
    ev.update([[1], [0], [0]], [[0.2], [0.3], [0.4]])
    (t,) = ev.search_thresholds("macro")
    assert t <= 0.2
    assert ev.result([t])["f2_macro"] == pytest.approx(5 / 7)


def brute_force_samples_optimum(ev, labels, probs):
    grid = np.arange(ev.num_bins + 2) / ev.num_bins
    best = -1.0
    for t in itertools.product(grid, repeat=labels.shape[1]):
        best = max(best, ev.result(np.array(t))["f2_samples"])
    return best


# Seeds where the per-label (macro) thresholds are NOT per-sample optimal, so
# the coupled search has work to do; the optimum is found by brute force over
# every combination of grid thresholds (10^3 of them).
@pytest.mark.parametrize("seed", [1, 2, 4, 6])
def test_samples_search_reaches_brute_force_optimum(seed):
    labels, probs = random_data(seed, n=40, num_labels=3)
    ev = MultiLabelEvaluator(3, num_bins=8)
    ev.update(labels, probs)
    found = ev.result(ev.search_thresholds("samples"))["f2_samples"]
    assert found == pytest.approx(brute_force_samples_optimum(ev, labels, probs), abs=1e-12)
    assert found > ev.result(ev.search_thresholds("macro"))["f2_samples"]
    assert found >= ev.result()["f2_samples_at_0.5"] - 1e-12


def rare_label_example():
    """Label a is on every image; r is on image 1 only, and scored below 3 negatives.

    Bins of 0.1. r's own F2: predicting all 4 images (t <= 0.2) gives tp 1, fp 3:
    5 / (5 + 3) = 5/8; any t that drops image 1 gives tp 0 -> 0. So per_label
    takes the middle of t in {0, 0.1, 0.2}. Per image, with a predicted: r off
    scores image 1 at 5/(5+4) = 5/9 and the others 1 -> (5/9 + 3)/4 = 8/9; r on
    everywhere makes image 1 perfect but costs 1/6 on each other image ->
    (1 + 3 * 5/6)/4 = 7/8 < 8/9. So "samples" never predicts r: its F2 is 0.
    """
    ev = MultiLabelEvaluator(2, beta=2.0, label_names=["a", "r"], num_bins=10)
    ev.update([[1, 1], [1, 0], [1, 0], [1, 0]],
              [[0.95, 0.25], [0.95, 0.45], [0.95, 0.55], [0.95, 0.65]])
    return ev


def test_per_label_search_maximises_each_labels_own_fbeta_by_hand():
    ev = rare_label_example()
    t = ev.search_thresholds("per_label")
    # a: every t in [0, 0.9] gives F2 1 (t = 1.0 predicts nothing) -> middle of k = 0..9
    np.testing.assert_allclose(t, [0.4, 0.1])
    r = ev.result(t)
    assert r["f2/r"] == pytest.approx(5 / 8) and r["recall/r"] == 1.0
    assert r["f2_samples"] == pytest.approx(7 / 8)
    assert r["f2_macro"] == pytest.approx((1 + 5 / 8) / 2)
    np.testing.assert_array_equal(ev.search_thresholds("macro"), t)  # the old name still works

    samples = ev.search_thresholds("samples")
    assert samples[1] > 0.65                                 # r is never predicted
    s = ev.result(samples)
    assert s["f2/r"] == 0.0 and s["recall/r"] == 0.0
    assert s["f2_samples"] == pytest.approx(8 / 9) and s["f2_samples"] > r["f2_samples"]
    assert s["f2_macro"] == pytest.approx(1 / 2) and s["f2_macro"] < r["f2_macro"]
    with pytest.raises(ValueError, match="samples, per_label"):
        ev.search_thresholds("micro")


def test_truncation_keeps_histogram_metrics_and_refuses_samples_search():
    labels, probs = random_data(4, n=30)
    full = MultiLabelEvaluator(5)
    full.update(labels, probs)
    capped = MultiLabelEvaluator(5, max_samples=10)
    capped.update(labels[:8], probs[:8])
    assert not capped.truncated
    capped.update(labels[8:], probs[8:])
    assert capped.truncated and capped.num_examples == 30
    a, b = full.result(), capped.result()
    assert math.isnan(b["f2_samples_at_0.5"])
    for key in a:
        if "samples" not in key:       # 0.5 is on the grid: histograms are exact there
            assert a[key] == pytest.approx(b[key], nan_ok=True), key
    with pytest.raises(ValueError, match="max_samples"):
        capped.search_thresholds("samples")
    np.testing.assert_array_equal(capped.search_thresholds("macro"),
                                  full.search_thresholds("macro"))


@pytest.mark.parametrize("labels,probs,match", [
    ([[1, 0, 1]], [[2.5, -1.0, 0.3]], "sigmoid"),
    ([[1, 0, 1]], [[np.nan, 0.1, 0.3]], "NaN"),
    ([[2, 0, 1]], [[0.5, 0.1, 0.3]], "0 or 1"),
    ([[1, 0]], [[0.5, 0.1]], "shape"),
])
def test_bad_inputs_raise(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        MultiLabelEvaluator(3).update(labels, probs)


def test_prediction_stats():
    ev = MultiLabelEvaluator(2)
    ev.update([[1, 0], [0, 1]], [[0.2, 0.5], [0.4, 0.5]])
    std, mean = ev.prediction_stats()
    np.testing.assert_allclose(mean, [0.3, 0.5], rtol=1e-6)
    np.testing.assert_allclose(std, [0.1, 0.0], atol=1e-7)


# -------------------------------------------------------------- thresholds IO
def test_thresholds_roundtrip_and_reorder(tmp_path):
    path = str(tmp_path / "sub" / "thresholds.json")
    save_thresholds(path, [0.2, 0.35, 1.005], ["a", "b", "c"], metadata={"objective": "samples"})
    t, names = load_thresholds(path)
    assert names == ["a", "b", "c"]
    np.testing.assert_array_equal(t, [0.2, 0.35, 1.005])
    t, names = load_thresholds(path, label_names=["c", "a", "b"])
    np.testing.assert_array_equal(t, [1.005, 0.2, 0.35])
    assert json.load(open(path))["metadata"] == {"objective": "samples"}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["thresholds.json"]


def test_thresholds_file_records_objective_and_weights(tmp_path):
    path = str(tmp_path / "thresholds.json")
    assert thresholds_path_for(path, "raw") == path
    ema_path = thresholds_path_for(path, "ema")
    assert ema_path == str(tmp_path / "thresholds_ema.json")
    save_thresholds(ema_path, [0.3, 0.6], ["a", "b"], objective="per_label", weights="ema",
                    metadata={"fbeta": 2.0})
    doc = json.load(open(ema_path))
    assert doc["objective"] == "per_label" and doc["weights"] == "ema"
    read = read_thresholds(ema_path, label_names=["b", "a"])
    np.testing.assert_array_equal(read.thresholds, [0.6, 0.3])
    assert (read.label_names, read.objective, read.weights) == (["b", "a"], "per_label", "ema")
    assert read.metadata == {"fbeta": 2.0}
    # a file written before objective and weights were recorded still loads
    json.dump({"format": "tapeworks-thresholds/1", "label_names": ["a", "b"],
               "thresholds": [0.2, 0.4], "metadata": {}}, open(path, "w"))
    old = read_thresholds(path)
    assert old.objective is None and old.weights is None
    np.testing.assert_array_equal(load_thresholds(path)[0], [0.2, 0.4])


def test_saved_thresholds_are_readable_by_other_users(tmp_path):
    """mkstemp makes 0600; a serving user must read the file: 0644 under umask 022."""
    old = os.umask(0o022)
    try:
        save_thresholds(str(tmp_path / "t.json"), [0.5], ["a"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "t.json").st_mode) == 0o644


def test_thresholds_file_errors_name_the_file(tmp_path):
    path = tmp_path / "t.json"
    with pytest.raises(ThresholdFileError, match="does not exist"):
        load_thresholds(str(path))
    path.write_text("{not json")
    with pytest.raises(ThresholdFileError, match="t.json"):
        load_thresholds(str(path))
    save_thresholds(str(path), [0.5, 0.5], ["a", "b"])
    with pytest.raises(ThresholdFileError, match="other labels"):
        load_thresholds(str(path), label_names=["a", "z"])
    with pytest.raises(ValueError):
        save_thresholds(str(path), [0.5, 0.5], ["a", "b", "c"])


# ------------------------------------------------------------------ multi-class
def test_multiclass_accuracy_topk_and_pessimistic_ties():
    ev = MultiClassEvaluator(4, top_k=(2,), class_names=["w", "x", "y", "z"])
    probs = np.array([[0.7, 0.1, 0.1, 0.1],     # true 0: top-1
                      [0.5, 0.3, 0.1, 0.1],     # true 1: top-2
                      [0.25, 0.25, 0.25, 0.25],  # true 2: collapsed, counts as wrong
                      [0.1, 0.2, 0.3, 0.4]])    # true 3: top-1
    ev.update([0, 1], probs[:2])
    ev.update(np.eye(4)[[2, 3]], probs[2:])     # one-hot labels work too
    r = ev.result()
    assert r["accuracy"] == 0.5
    assert r["top2_accuracy"] == 0.75
    assert r["balanced_accuracy"] == 0.5
    assert r["recall/w"] == 1.0 and r["recall/x"] == 0.0


# ------------------------------------------------------------------ segmentation
def test_iou_hand_computed_and_streaming():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 0])
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    m = ConfusionMatrixIoU(4)        # class 3 never appears: NaN, left out of the mean
    m.update(labels[:4].reshape(2, 2), preds[:4].reshape(2, 2))
    scores = np.eye(4)[preds[4:]] * 0.9 + 0.025        # scores [..., C] are argmax-ed
    m.update(labels[4:], scores)
    r = m.result()
    assert r["iou/class_0"] == pytest.approx(1 / 3)
    assert r["iou/class_1"] == pytest.approx(2 / 3)
    assert r["iou/class_2"] == pytest.approx(1 / 2)
    assert math.isnan(r["iou/class_3"])
    assert r["mean_iou"] == pytest.approx(0.5)
    assert r["pixel_accuracy"] == pytest.approx(4 / 6)
    one = ConfusionMatrixIoU(4)
    one.update(labels, preds)
    np.testing.assert_array_equal(one.confusion_matrix, m.confusion_matrix)
    with pytest.raises(ValueError, match="class ids"):
        one.update([5], [0])
