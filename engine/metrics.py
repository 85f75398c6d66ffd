"""Streaming evaluation metrics, computed on the host with numpy.

The engine gathers each validation batch's labels and probabilities from all
replicas and calls ``update``; ``result`` turns what was accumulated into a
flat dict of floats (TensorBoard / CSV friendly). Feeding batches gives the
same numbers as one update with everything (every accumulator is a count, a
sum or a concatenation).

Why per-label thresholds: on imbalanced multi-label data a fixed 0.5 makes
the F-beta of rare labels look hopeless even when their ranking is good.
``MultiLabelEvaluator.search_thresholds`` picks one threshold per label on
the validation data, maximising each label's own F-beta ("per_label") or the
mean per-image F-beta ("samples"); ``save_thresholds`` / ``read_thresholds``
carry them, with the objective and the weights they were searched on, to
prediction. Export searches its own, on the weights it writes.

Decision rule everywhere: a label is predicted when ``prob >= threshold``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "MultiLabelEvaluator", "MultiClassEvaluator", "ConfusionMatrixIoU",
    "ThresholdFileError", "ThresholdSet", "THRESHOLD_OBJECTIVES", "save_thresholds",
    "load_thresholds", "read_thresholds", "thresholds_path_for", "fbeta_from_counts",
]

# What the per-label threshold search maximises (MultiLabelEvaluator.search_thresholds):
# "samples": the mean per-example F-beta (the Planet competition's score), labels coupled;
# "per_label": each label's own F-beta, each label independently.
THRESHOLD_OBJECTIVES = ("samples", "per_label")


class NonFiniteOutputs(ValueError):
    """The model's outputs were NaN or inf: a training run's divergence, not a metrics bug."""


def _names(names: Optional[Sequence[str]], count: int, prefix: str) -> List[str]:
    if names is None:
        return [f"{prefix}_{i}" for i in range(count)]
    names = [str(n) for n in names]
    if len(names) != count:
        raise ValueError(f"got {len(names)} names for {count} {prefix}s")
    if len(set(names)) != count:
        raise ValueError(f"{prefix} names must be unique: {names}")
    return names


def fbeta_from_counts(tp, fp, fn, beta: float, zero_division: float = 1.0) -> np.ndarray:
    """F-beta = (1 + b^2) tp / ((1 + b^2) tp + b^2 fn + fp), elementwise.

    Where tp = fp = fn = 0 (no positives, none predicted) F is undefined and
    ``zero_division`` is returned; see MultiLabelEvaluator for why it is 1.
    """
    tp, fp, fn = (np.asarray(a, np.float64) for a in (tp, fp, fn))
    b2 = float(beta) ** 2
    denom = (1.0 + b2) * tp + b2 * fn + fp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, (1.0 + b2) * tp / np.where(denom > 0, denom, 1.0),
                        zero_division)


def _ratio(num, den, zero_division: float) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), zero_division)


def _plateau_middle(scores: np.ndarray, tol: float = 1e-12) -> int:
    """Index of the middle of the first run of maximal scores.

    Thresholds anywhere on a flat optimum score the same on validation; the
    middle of the run is the one least likely to be on the wrong side of a
    test example (the same reasoning as a max-margin split).
    """
    best = scores.max()
    start = int(np.flatnonzero(scores >= best - tol)[0])
    end = start
    while end + 1 < scores.size and scores[end + 1] >= best - tol:
        end += 1
    return (start + end) // 2


class MultiLabelEvaluator:
    """Streaming multi-label evaluation with F-beta, AUC and threshold search.

    (~300 lines because every result -- F-beta at any threshold, the two
    threshold searches, AUC -- is read off the same per-label histograms;
    the searches are its longest methods and share their counting helpers.)

    Memory: per-label histograms of positive and negative probabilities on a
    grid of ``num_bins`` bins (O(L * bins)) give micro/macro F-beta at any
    grid threshold, the per-label threshold search and AUC. The per-sample
    ("samples") F-beta -- the Planet competition's mean per-image F2 -- needs
    each example's decisions on all labels together, so the raw
    probabilities (float32) and labels (bool) are kept as well, up to
    ``max_samples`` examples: 5 bytes per example and label, 16 MB for the
    default 250,000 examples of 13 labels. Validation sets here are a few
    thousand images. Past the cap the raw arrays stop growing, per-sample
    metrics become NaN and ``search_thresholds("samples")`` raises; micro,
    macro and AUC still cover every example (from the histograms, with
    thresholds rounded up to the bin grid).

    Bins: bin k (0 <= k < num_bins) holds probabilities in [k/n, (k+1)/n) and
    one extra bin holds exactly 1.0, so "prob >= k/n" is "bin >= k" exactly
    and thresholds on the grid are evaluated without approximation.

    Undefined ratios (0/0) take ``zero_division``, 1.0 by default: a label
    (or image) with no positives that the model never predicts has done
    everything right. With 0.0 the threshold search could not tell a label
    that is never predicted from one predicted everywhere, and would pick
    threshold 0 for labels absent from the validation split.
    """

    def __init__(self, num_labels: int, beta: float = 2.0,
                 label_names: Optional[Sequence[str]] = None, num_bins: int = 200, *,
                 max_samples: int = 250_000, zero_division: float = 1.0):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        self.num_labels = int(num_labels)
        self.beta = float(beta)
        self.label_names = _names(label_names, self.num_labels, "label")
        self.num_bins = int(num_bins)
        self.max_samples = int(max_samples)
        self.zero_division = float(zero_division)
        self.prefix = f"f{self.beta:g}"
        self.reset()

    # ------------------------------------------------------------ streaming
    def reset(self) -> None:
        shape = (self.num_labels, self.num_bins + 1)
        self._pos_hist = np.zeros(shape, np.int64)
        self._neg_hist = np.zeros(shape, np.int64)
        self._count = 0
        self._prob_sum = np.zeros(self.num_labels, np.float64)
        self._prob_sq_sum = np.zeros(self.num_labels, np.float64)
        self._raw_probs: List[np.ndarray] = []
        self._raw_labels: List[np.ndarray] = []
        self._raw_count = 0
        self.truncated = False

    @property
    def num_examples(self) -> int:
        return self._count

    def _bins(self, probs: np.ndarray) -> np.ndarray:
        """Bin index of each probability; float64 so p >= k/n <=> bin >= k."""
        scaled = np.floor(probs.astype(np.float64) * self.num_bins)
        return np.clip(scaled, 0, self.num_bins).astype(np.int64)

    def update(self, labels, probs) -> None:
        """Adds a batch: labels [B, L] in {0, 1}, probs [B, L] in [0, 1]."""
        labels = np.asarray(labels)
        probs = np.asarray(probs, dtype=np.float32)
        if probs.ndim != 2 or probs.shape[1] != self.num_labels:
            raise ValueError(f"probs must have shape [B, {self.num_labels}], got {probs.shape}")
        if labels.shape != probs.shape:
            raise ValueError(f"labels {labels.shape} and probs {probs.shape} differ in shape")
        if probs.shape[0] == 0:
            return
        if not np.all(np.isfinite(probs)):
            raise NonFiniteOutputs("probabilities contain NaN or inf: the model's outputs diverged")
        if probs.min() < 0 or probs.max() > 1:
            raise ValueError("probabilities must lie in [0, 1]; pass sigmoid(logits), not logits")
        if not np.all((labels == 0) | (labels == 1)):
            raise ValueError("multi-label targets must be 0 or 1")
        positive = labels.astype(bool)
        bins = self._bins(probs)
        width = self.num_bins + 1
        flat = (np.arange(self.num_labels)[None, :] * width + bins)
        size = self.num_labels * width
        self._pos_hist += np.bincount(flat[positive], minlength=size).reshape(self._pos_hist.shape)
        self._neg_hist += np.bincount(flat[~positive], minlength=size).reshape(self._neg_hist.shape)
        self._count += probs.shape[0]
        p64 = probs.astype(np.float64)
        self._prob_sum += p64.sum(axis=0)
        self._prob_sq_sum += (p64 * p64).sum(axis=0)
        if not self.truncated:
            if self._raw_count + probs.shape[0] <= self.max_samples:
                self._raw_probs.append(probs.copy())
                self._raw_labels.append(positive)
                self._raw_count += probs.shape[0]
            else:
                self.truncated = True
                self._raw_probs, self._raw_labels, self._raw_count = [], [], 0

    def _raw(self) -> Tuple[np.ndarray, np.ndarray]:
        if len(self._raw_probs) > 1:   # concatenate once, keep the result
            self._raw_probs = [np.concatenate(self._raw_probs)]
            self._raw_labels = [np.concatenate(self._raw_labels)]
        if not self._raw_probs:
            empty = np.zeros((0, self.num_labels))
            return empty.astype(np.float32), empty.astype(bool)
        return self._raw_probs[0], self._raw_labels[0]

    def prediction_stats(self) -> Tuple[np.ndarray, np.ndarray]:
        """(std, mean) of each label's probabilities over everything seen.

        The inputs of engine.collapse.check_prediction_collapse.
        """
        n = max(self._count, 1)
        mean = self._prob_sum / n
        var = np.maximum(self._prob_sq_sum / n - mean * mean, 0.0)
        return np.sqrt(var), mean

    # ----------------------------------------------------------- counting
    def _hist_counts_ge(self) -> Tuple[np.ndarray, np.ndarray]:
        """tp[l, k], fp[l, k]: positives / negatives with bin >= k, k = 0..n+1.

        Threshold index k means threshold k / num_bins; k = n + 1 (> 1.0)
        means "never predict".
        """
        def ge(hist):
            rev = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
            return np.concatenate([rev, np.zeros((hist.shape[0], 1), np.int64)], axis=1)
        return ge(self._pos_hist), ge(self._neg_hist)

    def _label_counts(self, thresholds: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-label tp, fp, fn at the thresholds."""
        if not self.truncated:
            probs, positive = self._raw()
            pred = probs.astype(np.float64) >= thresholds[None, :]
            tp = np.sum(pred & positive, axis=0)
            fp = np.sum(pred & ~positive, axis=0)
            fn = np.sum(~pred & positive, axis=0)
            return tp, fp, fn
        # Histograms only: round each threshold up to the grid.
        k = np.clip(np.ceil(thresholds * self.num_bins - 1e-9), 0, self.num_bins + 1).astype(int)
        tp_ge, fp_ge = self._hist_counts_ge()
        rows = np.arange(self.num_labels)
        tp, fp = tp_ge[rows, k], fp_ge[rows, k]
        return tp, fp, tp_ge[:, 0] - tp

    def _per_sample_scores(self, decisions: np.ndarray, positive: np.ndarray) -> np.ndarray:
        tp = np.sum(decisions & positive, axis=1)
        fp = np.sum(decisions & ~positive, axis=1)
        fn = np.sum(~decisions & positive, axis=1)
        return fbeta_from_counts(tp, fp, fn, self.beta, self.zero_division)

    def _scores_at(self, thresholds: np.ndarray, suffix: str) -> Dict[str, float]:
        tp, fp, fn = self._label_counts(thresholds)
        zd, b, p = self.zero_division, self.beta, self.prefix
        per_label_f = fbeta_from_counts(tp, fp, fn, b, zd)
        precision = _ratio(tp, tp + fp, zd)
        recall = _ratio(tp, tp + fn, zd)
        out = {
            f"{p}_micro{suffix}": float(fbeta_from_counts(tp.sum(), fp.sum(), fn.sum(), b, zd)),
            f"{p}_macro{suffix}": float(per_label_f.mean()),
        }
        if self.truncated:
            out[f"{p}_samples{suffix}"] = float("nan")
        else:
            probs, positive = self._raw()
            scores = self._per_sample_scores(probs.astype(np.float64) >= thresholds[None, :],
                                             positive)
            out[f"{p}_samples{suffix}"] = float(scores.mean()) if scores.size else float("nan")
        for i, name in enumerate(self.label_names):
            out[f"precision{suffix}/{name}"] = float(precision[i])
            out[f"recall{suffix}/{name}"] = float(recall[i])
            out[f"{p}{suffix}/{name}"] = float(per_label_f[i])
        return out

    def auc(self) -> np.ndarray:
        """Per-label ROC AUC from the histograms (trapezoid; NaN without both classes).

        Probabilities in the same bin count as ties (half credit), so the
        value is exact when no bin mixes a positive and a negative and within
        the bin resolution otherwise.
        """
        tp_ge, fp_ge = self._hist_counts_ge()
        num_pos, num_neg = tp_ge[:, :1], fp_ge[:, :1]
        with np.errstate(divide="ignore", invalid="ignore"):
            tpr = tp_ge / num_pos
            fpr = fp_ge / num_neg
        # thresholds rise with k, so the ROC curve runs from (1, 1) to (0, 0)
        area = np.sum((fpr[:, :-1] - fpr[:, 1:]) * (tpr[:, :-1] + tpr[:, 1:]) / 2.0, axis=1)
        defined = (num_pos[:, 0] > 0) & (num_neg[:, 0] > 0)
        return np.where(defined, area, np.nan)

    # -------------------------------------------------------------- results
    def result(self, thresholds=None) -> Dict[str, float]:
        """A flat dict of floats.

        Always: f{beta}_micro_at_0.5, f{beta}_macro_at_0.5, f{beta}_samples_at_0.5,
        precision_at_0.5/NAME, recall_at_0.5/NAME, f{beta}_at_0.5/NAME,
        auc/NAME, macro_auc (mean over labels with both classes), num_examples.
        With thresholds [L]: f{beta}_micro, f{beta}_macro, f{beta}_samples,
        precision/NAME, recall/NAME, f{beta}/NAME at those thresholds.
        """
        if self._count == 0:
            raise ValueError("no examples were evaluated")
        out = self._scores_at(np.full(self.num_labels, 0.5), "_at_0.5")
        if thresholds is not None:
            out.update(self._scores_at(self._check_thresholds(thresholds), ""))
        auc = self.auc()
        for i, name in enumerate(self.label_names):
            out[f"auc/{name}"] = float(auc[i])
        defined = auc[~np.isnan(auc)]
        out["macro_auc"] = float(defined.mean()) if defined.size else float("nan")
        out["num_examples"] = float(self._count)
        return out

    def _check_thresholds(self, thresholds) -> np.ndarray:
        t = np.asarray(thresholds, np.float64).reshape(-1)
        if t.shape != (self.num_labels,) or not np.all(np.isfinite(t)):
            raise ValueError(f"thresholds must be {self.num_labels} finite numbers, got {t}")
        return t

    # ------------------------------------------------------ threshold search
    def search_thresholds(self, objective: str = "samples", max_rounds: int = 20) -> np.ndarray:
        """Per-label thresholds [L] on the bin grid that maximise F-beta.

        "per_label" (also accepted as "macro", its old name): each label's own
        F-beta, independently of the others -- an exact argmax over the grid
        from the histograms. It maximises the macro F-beta, and no label's
        F-beta can be raised by moving its threshold.
        "samples": the mean per-example F-beta couples the labels, so it is
        coordinate ascent: start from the better of the macro thresholds and
        0.5, then repeatedly give one label the grid threshold that maximises
        the objective with the others fixed, until a full round changes
        nothing. Each step is exact and O(N + bins) -- for every example the
        F-beta with and without that label predicted is known, and a reverse
        cumulative sum over bins gives the objective at every threshold.
        Coordinate ascent reaches a local optimum (no single label can
        improve), which is the global one when labels interact weakly.

        Among thresholds that score the same the middle of the optimal run is
        taken. A value above 1.0 means "never predict this label".
        """
        if self._count == 0:
            raise ValueError("no examples were evaluated")
        if objective not in THRESHOLD_OBJECTIVES + ("macro",):
            raise ValueError(f"objective must be one of {', '.join(THRESHOLD_OBJECTIVES)}, "
                             f"got {objective!r}")
        macro_k = self._search_macro()
        if objective in ("per_label", "macro"):
            return macro_k / self.num_bins
        if self.truncated:
            raise ValueError(f"more than max_samples={self.max_samples} examples were evaluated, "
                             "so per-sample F-beta is unavailable; use objective='per_label' or "
                             "raise max_samples")
        probs, positive = self._raw()
        bins = self._bins(probs)
        half = int(math.ceil(self.num_bins / 2))
        best_k, best_score = None, -np.inf
        for start in (macro_k, np.full(self.num_labels, half)):
            k, score = self._coordinate_ascent(bins, positive, start.copy(), max_rounds)
            if score > best_score + 1e-12:
                best_k, best_score = k, score
        return best_k / self.num_bins

    def _search_macro(self) -> np.ndarray:
        tp_ge, fp_ge = self._hist_counts_ge()
        fn = tp_ge[:, :1] - tp_ge
        scores = fbeta_from_counts(tp_ge, fp_ge, fn, self.beta, self.zero_division)
        return np.array([_plateau_middle(row) for row in scores], np.int64)

    def _coordinate_ascent(self, bins: np.ndarray, positive: np.ndarray, k: np.ndarray,
                           max_rounds: int) -> Tuple[np.ndarray, float]:
        n = bins.shape[0]
        b, zd, width = self.beta, self.zero_division, self.num_bins + 1
        decide = bins >= k[None, :]
        tp = np.sum(decide & positive, axis=1)
        fp = np.sum(decide & ~positive, axis=1)
        fn = np.sum(~decide & positive, axis=1)
        score = float(fbeta_from_counts(tp, fp, fn, b, zd).mean())
        for _ in range(max_rounds):
            changed = False
            for j in range(self.num_labels):
                y, d = positive[:, j], decide[:, j]
                tp0, fp0, fn0 = tp - (d & y), fp - (d & ~y), fn - (~d & y)
                f_off = fbeta_from_counts(tp0, fp0, fn0 + y, b, zd)      # label j not predicted
                f_on = fbeta_from_counts(tp0 + y, fp0 + ~y, fn0, b, zd)  # label j predicted
                gain = np.bincount(bins[:, j], weights=f_on - f_off, minlength=width)
                gain_ge = np.concatenate([np.cumsum(gain[::-1])[::-1], [0.0]])
                scores = (f_off.sum() + gain_ge) / n
                if scores.max() > scores[k[j]] + 1e-12:
                    k[j] = _plateau_middle(scores)
                    d = bins[:, j] >= k[j]
                    decide[:, j] = d
                    tp, fp, fn = tp0 + (d & y), fp0 + (d & ~y), fn0 + (~d & y)
                    score = float(scores[k[j]])
                    changed = True
            if not changed:
                break
        return k, score


# --------------------------------------------------------------------------
# thresholds on disk

class ThresholdFileError(ValueError):
    """A thresholds file is missing, malformed, or for other labels."""


_THRESHOLDS_FORMAT = "tapeworks-thresholds/1"


@dataclasses.dataclass(frozen=True)
class ThresholdSet:
    """A thresholds file as read: values in the asked label order, and what they belong to.

    objective and weights are None in files written before they were recorded.
    """
    thresholds: np.ndarray
    label_names: List[str]
    objective: Optional[str] = None
    weights: Optional[str] = None
    metadata: Dict = dataclasses.field(default_factory=dict)


def thresholds_path_for(path: str, weights: str) -> str:
    """The file of one set of weights next to `path`: thresholds.json -> thresholds_ema.json.

    A run with EMA evaluates two models, and each has its own thresholds; the
    raw ones keep the plain name, so files written before EMA had its own
    still mean what they meant.
    """
    if weights == "raw":
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_{weights}{ext}"


def save_thresholds(path: str, thresholds, label_names: Sequence[str], *,
                    objective: Optional[str] = None, weights: Optional[str] = None,
                    metadata: Optional[dict] = None) -> None:
    """Writes per-label thresholds as JSON, atomically (write, then rename).

    The labels are stored by name, so a reader with a different label order
    still applies each threshold to the right label. objective (what the
    search maximised) and weights ("raw" or "ema": which model they were
    searched on) are top-level fields, so a reader can tell whether the set
    fits the model it serves. The file gets the mode a plain open() would
    give (0644 under the usual umask 022): a serving user must be able to
    read it, and mkstemp alone makes it 0600.
    """
    t = np.asarray(thresholds, np.float64).reshape(-1)
    names = _names(label_names, t.size, "label")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"thresholds must be finite, got {t}")
    doc = {"format": _THRESHOLDS_FORMAT, "label_names": names,
           "thresholds": [float(v) for v in t]}
    if objective is not None:
        doc["objective"] = str(objective)
    if weights is not None:
        doc["weights"] = str(weights)
    doc["metadata"] = dict(metadata or {})
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".thresholds-", suffix=".json")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    """The process umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_thresholds(path: str, label_names: Optional[Sequence[str]] = None
                    ) -> Tuple[np.ndarray, List[str]]:
    """Reads a thresholds file -> (thresholds [L], label names).

    With label_names, the thresholds come back in that order, and a file that
    lacks one of them or has others raises ThresholdFileError.
    """
    read = read_thresholds(path, label_names)
    return read.thresholds, read.label_names


def read_thresholds(path: str, label_names: Optional[Sequence[str]] = None) -> ThresholdSet:
    """load_thresholds, plus the objective, weights and metadata the file records."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ThresholdFileError(f"thresholds file {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ThresholdFileError(f"thresholds file {path} is unreadable: {e}") from None
    try:
        if doc.get("format") != _THRESHOLDS_FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, want {_THRESHOLDS_FORMAT!r}")
        names = [str(n) for n in doc["label_names"]]
        values = np.asarray(doc["thresholds"], np.float64)
        if values.shape != (len(names),) or len(set(names)) != len(names):
            raise ValueError("needs one threshold per uniquely named label")
        if not np.all(np.isfinite(values)):
            raise ValueError("thresholds must be finite")
        recorded = dict(objective=doc.get("objective"), weights=doc.get("weights"),
                        metadata=dict(doc.get("metadata") or {}))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ThresholdFileError(f"thresholds file {path} is malformed: {e}") from None
    if label_names is None:
        return ThresholdSet(values, names, **recorded)
    wanted = [str(n) for n in label_names]
    missing = [n for n in wanted if n not in names]
    extra = [n for n in names if n not in wanted]
    if missing or extra:
        raise ThresholdFileError(f"thresholds file {path} is for other labels "
                                 f"(missing {missing}, unexpected {extra})")
    index = {n: i for i, n in enumerate(names)}
    return ThresholdSet(values[[index[n] for n in wanted]], wanted, **recorded)


# --------------------------------------------------------------------------
# multi-class

class MultiClassEvaluator:
    """Streaming accuracy, top-k accuracy and per-class recall.

    Ties count against the model: the true class is within the top k only
    when fewer than k other classes score at least as high. A collapsed model
    that outputs the same probability for every class therefore scores 0
    instead of 100%. balanced_accuracy (mean per-class recall over classes
    that occur) is the number to watch on imbalanced data.
    """

    def __init__(self, num_classes: int, top_k: Sequence[int] = (5,),
                 class_names: Optional[Sequence[str]] = None):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.top_k = tuple(sorted({int(k) for k in top_k if 1 < int(k) < num_classes}))
        self.class_names = _names(class_names, self.num_classes, "class")
        self.reset()

    def reset(self) -> None:
        self._count = 0
        self._correct = {k: 0 for k in (1,) + self.top_k}
        self._support = np.zeros(self.num_classes, np.int64)
        self._hits = np.zeros(self.num_classes, np.int64)

    def update(self, labels, probs) -> None:
        """labels: class ids [B] or one-hot [B, C]; probs: [B, C] scores."""
        probs = np.asarray(probs, np.float64)
        labels = np.asarray(labels)
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must have shape [B, {self.num_classes}], got {probs.shape}")
        if labels.ndim == 2:
            labels = np.argmax(labels, axis=1)
        labels = labels.astype(np.int64).reshape(-1)
        if labels.shape[0] != probs.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {probs.shape[0]} predictions")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.num_classes})")
        true_score = probs[np.arange(labels.size), labels]
        # other classes scoring at least as high as the true one
        rank = np.sum(probs >= true_score[:, None], axis=1) - 1
        for k in self._correct:
            self._correct[k] += int(np.sum(rank < k))
        self._support += np.bincount(labels, minlength=self.num_classes)
        self._hits += np.bincount(labels[rank < 1], minlength=self.num_classes)
        self._count += labels.size

    def result(self) -> Dict[str, float]:
        if self._count == 0:
            raise ValueError("no examples were evaluated")
        out = {"accuracy": self._correct[1] / self._count}
        for k in self.top_k:
            out[f"top{k}_accuracy"] = self._correct[k] / self._count
        seen = self._support > 0
        recall = _ratio(self._hits, self._support, float("nan"))
        out["balanced_accuracy"] = float(recall[seen].mean())
        for i, name in enumerate(self.class_names):
            out[f"recall/{name}"] = float(recall[i])
        out["num_examples"] = float(self._count)
        return {k: float(v) for k, v in out.items()}


# --------------------------------------------------------------------------
# segmentation

class ConfusionMatrixIoU:
    """Streaming confusion matrix -> per-class IoU, mean IoU, pixel accuracy.

    IoU_c = TP / (TP + FP + FN). A class absent from both labels and
    predictions has no IoU (NaN) and is left out of mean_iou, as in Keras'
    MeanIoU. Labels must be class ids in [0, C); there is no ignore label.
    """

    def __init__(self, num_classes: int, class_names: Optional[Sequence[str]] = None):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.class_names = _names(class_names, self.num_classes, "class")
        self.reset()

    def reset(self) -> None:
        self.confusion_matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, labels, predictions) -> None:
        """labels: ids [...]; predictions: ids [...] or scores [..., C] (argmax)."""
        labels = np.asarray(labels)
        predictions = np.asarray(predictions)
        if predictions.ndim == labels.ndim + 1 and predictions.shape[-1] == self.num_classes:
            predictions = np.argmax(predictions, axis=-1)
        if predictions.shape != labels.shape:
            raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} "
                             "do not match")
        labels = labels.astype(np.int64).reshape(-1)
        predictions = predictions.astype(np.int64).reshape(-1)
        c = self.num_classes
        for what, ids in (("labels", labels), ("predictions", predictions)):
            if ids.size and (ids.min() < 0 or ids.max() >= c):
                raise ValueError(f"{what} must be class ids in [0, {c})")
        self.confusion_matrix += np.bincount(labels * c + predictions,
                                             minlength=c * c).reshape(c, c)

    def per_class_iou(self) -> np.ndarray:
        cm = self.confusion_matrix.astype(np.float64)
        tp = np.diag(cm)
        union = cm.sum(axis=0) + cm.sum(axis=1) - tp
        return _ratio(tp, union, float("nan"))

    def result(self) -> Dict[str, float]:
        iou = self.per_class_iou()
        defined = iou[~np.isnan(iou)]
        total = self.confusion_matrix.sum()
        out = {"mean_iou": float(defined.mean()) if defined.size else float("nan"),
               "pixel_accuracy": float(np.trace(self.confusion_matrix) / total)
               if total else float("nan")}
        for i, name in enumerate(self.class_names):
            out[f"iou/{name}"] = float(iou[i])
        return out
