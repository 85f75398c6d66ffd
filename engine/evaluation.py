"""One validation pass turned into metrics: the eval side of the trainer.

Kept apart from the trainer so the metrics a run reports (per-label tables,
threshold search, collapse warnings) change here without touching the loop.
Probabilities are made at this edge; the model and the loss see logits.

What a pass gives, for the three places a run's numbers go:

* ``run(prefix)`` returns the SUMMARY keys only -- the epoch line and the
  CSV (one column each, however many labels):
  multilabel/multiclass: {prefix}_loss, {prefix}_macro_auc,
  {prefix}_f{b}_samples_at_0.5, {prefix}_f{b}_samples;
  segmentation: {prefix}_loss, {prefix}_mean_iou, {prefix}_pixel_accuracy.
* ``label_scalars()`` gives the per-label keys of the latest passes, for
  TensorBoard: {prefix}_precision/NAME, {prefix}_recall/NAME,
  {prefix}_f{b}/NAME (at the searched thresholds), {prefix}_f{b}_at_0.5/NAME,
  {prefix}_auc/NAME, {prefix}_threshold/NAME and the micro/macro F-beta;
  segmentation: {prefix}_iou/NAME.
* The ``report`` callback (the trainer passes its log's ``line``) receives,
  after each pass, a compact per-label table (its header names the threshold
  objective) and any collapse warning.
* The thresholds searched on each pass are kept in ``thresholds[prefix]`` and
  saved per model: thresholds.json (raw weights), thresholds_ema.json (EMA).

Collapse detection (engine/collapse.py) is wired in here too:
``check_model()`` once at start (sigmoid/softmax in the head), the
prediction-collapse check after every pass, and ``observe_grad_norm`` for
the gradient-norm monitor the train loop feeds. Every warning is also kept
in ``self.warnings``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np
import tensorflow as tf

from engine.collapse import (GradientVanishingMonitor, check_output_activation,
                             check_prediction_collapse)
from engine.metrics import (ConfusionMatrixIoU, MultiLabelEvaluator, save_thresholds,
                            thresholds_path_for)
from engine.steps import make_eval_batch, make_segmentation_eval_batch

_SEG_REMEDY = "try --loss=ce+lovasz or --loss=dice, or check the learning rate"
_OBJECTIVE_TEXT = {"per_label": "each label's own F{b}", "macro": "each label's own F{b}",
                   "samples": "the mean per-image F{b}"}
# "Barely varies" is judged on the logit scale (see check_prediction_collapse):
# a rare label's probabilities vary little even when its logits do.
LOGIT_STD_FLOOR = 0.01


class Evaluation:
    def __init__(self, *, model, loss_fn: Callable, strategy, local_replicas: int, data,
                 input_size: int, batch_size: int, fbeta: float, multiclass: bool = False,
                 thresholds_path: Optional[str], task: Optional[str] = None,
                 threshold_objective: str = "per_label",
                 report: Optional[Callable[[str], None]] = None,
                 grad_floor: float = 1e-7, grad_patience: int = 100):
        """thresholds_path: where the raw model's searched per-label thresholds go
        (None: not saved); the EMA model's go next to it (thresholds_ema.json).

        threshold_objective: what the search maximises, "per_label" (each
        label's own F-beta) or "samples" (the mean per-example F-beta).

        task: "multilabel", "multiclass" or "segmentation" (default: from
        `multiclass`). report: called with each line of the per-label table
        and each warning (None: nothing printed; warnings are still kept).
        grad_floor / grad_patience: the gradient-vanishing monitor's settings.
        """
        self.task = task or ("multiclass" if multiclass else "multilabel")
        self.model = model
        self.data = data
        self.loss_fn = loss_fn
        self.input_size = input_size
        self.batch_size = batch_size
        self.fbeta = fbeta
        self.thresholds_path = thresholds_path
        self.threshold_objective = threshold_objective
        self.thresholds: Dict[str, np.ndarray] = {}  # prefix -> the latest searched thresholds
        self.report = report
        self.warnings: List[str] = []
        self.grad_monitor = GradientVanishingMonitor(floor=grad_floor, patience=grad_patience)
        self._details: Dict[str, Dict[str, float]] = {}  # prefix -> per-label scalars
        self.tables: Dict[str, List[str]] = {}             # prefix -> the latest table
        if self.task == "segmentation":
            self.eval_batch = make_segmentation_eval_batch(
                model=model, loss_fn=loss_fn, strategy=strategy, local_replicas=local_replicas,
                input_size=input_size, num_classes=data.num_labels)
        else:
            self.eval_batch = make_eval_batch(
                model=model, loss_fn=loss_fn, strategy=strategy, local_replicas=local_replicas,
                input_size=input_size, num_outputs=data.num_labels,
                multiclass=self.task == "multiclass")
        self.last = None  # the latest pass's evaluator (MultiLabelEvaluator or ConfusionMatrixIoU)

    # ------------------------------------------------------------- passes
    def run(self, prefix: str = "val", predict: Optional[Callable] = None,
            save: bool = True, report: Optional[bool] = None,
            weights: str = "raw") -> Dict[str, float]:
        """Loss and summary metrics over the validation split, keys prefixed by `prefix`_.

        predict: replaces the model (the baseline). report: print the table
        and check for collapse (default: when the model is evaluated).
        weights: which model this is, "raw" or "ema"; each saves its own
        thresholds file, so export can serve the set searched on what it writes.
        """
        report = predict is None if report is None else report
        if self.task == "segmentation":
            return self._run_segmentation(prefix, predict or self.eval_batch, report)
        names = self.data.label_names
        evaluator = MultiLabelEvaluator(self.data.num_labels, beta=self.fbeta, label_names=names)
        total, count, positives = feed_validation(evaluator, predict or self.eval_batch, self.data,
                                                  self.input_size, self.batch_size)
        thresholds = evaluator.search_thresholds(self.threshold_objective)
        self.thresholds[prefix] = thresholds
        if save and self.thresholds_path:
            save_thresholds(thresholds_path_for(self.thresholds_path, weights), thresholds, names,
                            objective=self.threshold_objective, weights=weights,
                            metadata={"fbeta": self.fbeta, "split": "val",
                                      "examples": evaluator.num_examples})
        self.last = evaluator
        metrics = evaluator.result(thresholds=thresholds)
        b = _beta_name(self.fbeta)
        out = {f"{prefix}_loss": total / max(count, 1)}
        for key in ("macro_auc", f"f{b}_samples_at_0.5", f"f{b}_samples"):
            if key in metrics:
                out[f"{prefix}_{key}"] = float(metrics[key])
        if report:
            details = {f"{prefix}_{k}": float(v) for k, v in metrics.items()
                       if "/" in k or k.startswith(f"f{b}_m")}
            details.update({f"{prefix}_threshold/{n}": float(t) for n, t in zip(names, thresholds)})
            self._details[prefix] = details
            self._emit_table(prefix, _label_table(prefix, names, metrics, thresholds, positives, b,
                                                  self.threshold_objective))
            std, mean = evaluator.prediction_stats()
            self._warn_collapse(prefix, "label", check_prediction_collapse(
                std, mean, names, logit_std_floor=LOGIT_STD_FLOOR))
        return out

    def _run_segmentation(self, prefix: str, predict: Callable, report: bool) -> Dict[str, float]:
        names = self.data.label_names
        iou = ConfusionMatrixIoU(self.data.num_labels, class_names=names)
        total, count = 0.0, 0
        sums = np.zeros((2, self.data.num_labels), np.float64)  # sum p, sum p^2 per class
        for images, masks in self.data.val_dataset(global_batch=self.batch_size,
                                                   input_size=self.input_size):
            ids, per_example, stats = predict(images, masks)
            iou.update(masks.numpy(), ids.numpy())
            sums += stats.numpy().astype(np.float64).sum(axis=0)
            total += float(tf.reduce_sum(per_example))
            count += int(per_example.shape[0])
        self.last = iou
        metrics = iou.result()
        out = {f"{prefix}_loss": total / max(count, 1), f"{prefix}_mean_iou": metrics["mean_iou"],
               f"{prefix}_pixel_accuracy": metrics["pixel_accuracy"]}
        if report:
            self._details[prefix] = {f"{prefix}_{k}": float(v) for k, v in metrics.items()
                                     if "/" in k}
            self._emit_table(prefix, _class_table(prefix, names, iou))
            pixels = max(float(iou.confusion_matrix.sum()), 1.0)
            mean = sums[0] / pixels
            std = np.sqrt(np.maximum(sums[1] / pixels - mean * mean, 0.0))
            self._warn_collapse(prefix, "class", check_prediction_collapse(
                std, mean, names, remedy=_SEG_REMEDY, what="class",
                logit_std_floor=LOGIT_STD_FLOOR))
            for w in _argmax_collapse(iou):
                self._warn(f"{prefix}: {w}")
        return out

    def baseline(self) -> Dict[str, float]:
        """The score of predicting each label's training prevalence: the bar to beat.

        Segmentation: every pixel gets the class shares as probabilities, so
        the majority class everywhere.
        """
        prevalence = np.clip(self.data.label_prevalence, 1e-6, 1 - 1e-6).astype(np.float32)
        if self.task == "segmentation":
            logit = tf.constant(np.log(prevalence))
            majority = int(np.argmax(prevalence))

            def predict(images, masks):
                shape = tf.shape(images)
                logits = tf.broadcast_to(logit, [shape[0], shape[1], shape[2], logit.shape[0]])
                ids = tf.fill([shape[0], shape[1], shape[2]], majority)
                return ids, self.loss_fn(masks, logits), tf.zeros([shape[0], 2, logit.shape[0]])

            return self.run("baseline", predict=predict, save=False)

        logit = tf.constant(np.log(prevalence / (1 - prevalence)))

        def predict(images, labels):
            logits = tf.tile(logit[None], [tf.shape(images)[0], 1])
            return tf.sigmoid(logits), self.loss_fn(labels, logits)

        return self.run("baseline", predict=predict, save=False)

    # ----------------------------------------------------------- reporting
    def label_scalars(self) -> Dict[str, float]:
        """Per-label (per-class) scalars of the latest reported passes, for TensorBoard."""
        out: Dict[str, float] = {}
        for details in self._details.values():
            out.update(details)
        return out

    def check_model(self) -> List[str]:
        """Once at start: warns when the model's head applies sigmoid/softmax."""
        warnings = check_output_activation(self.model)
        for w in warnings:
            self._warn(w)
        return warnings

    def observe_grad_norm(self, norm: float, steps: int = 1,
                          step: Optional[int] = None) -> List[str]:
        """Feeds the global gradient norm of a train-loop call that ran `steps` steps.

        The loop returns the norm of its last step; it stands for the call's
        `steps` steps, so the monitor's patience stays counted in steps.
        """
        warnings: List[str] = []
        for _ in range(max(int(steps), 1)):
            warnings += self.grad_monitor.update(norm, step=step)
        for w in warnings:
            self._warn(w)
        return warnings

    def _emit_table(self, prefix: str, lines: List[str]) -> None:
        self.tables[prefix] = lines
        if self.report is not None:
            for line in lines:
                self.report(line)

    def _warn(self, warning: str) -> None:
        self.warnings.append(warning)
        if self.report is not None:
            self.report("WARNING: " + warning)

    def _warn_collapse(self, prefix: str, what: str, warnings: List[str],
                       max_lines: int = 3) -> None:
        """Keeps every label's warning; prints them, or one line when there are many.

        Early in a run (a random backbone, a frozen phase) most labels can
        still sit at their prior; thirteen near-identical lines per epoch
        would drown the table, so past max_lines they are summarised.
        """
        if len(warnings) <= max_lines:
            for w in warnings:
                self._warn(f"{prefix}: {w}")
            return
        self.warnings.extend(f"{prefix}: {w}" for w in warnings)
        if self.report is not None:
            names = [w.split("'")[1] if w.count("'") >= 2 else "?" for w in warnings]
            self.report(f"WARNING: {prefix}: the predictions of {len(warnings)} {what}s look "
                        f"collapsed ({', '.join(names)}); the first: {warnings[0]}")


def feed_validation(evaluator: MultiLabelEvaluator, predict: Callable, data, input_size: int,
                    batch_size: int):
    """Feeds one pass over the validation split to evaluator -> (loss sum, count, positives).

    predict(images, labels) -> (probabilities, per-example loss or None).
    Shared by the trainer's passes and export's search on the exported
    weights, so both see the same examples in the same order.
    """
    total, count = 0.0, 0
    positives = np.zeros(data.num_labels, np.int64)
    for images, labels in data.val_dataset(global_batch=batch_size, input_size=input_size):
        probs, per_example = predict(images, labels)
        labels = labels.numpy()
        evaluator.update(labels, np.asarray(probs))
        positives += (labels > 0.5).sum(axis=0).astype(np.int64)
        if per_example is not None:
            total += float(tf.reduce_sum(per_example))
            count += int(per_example.shape[0])
    return total, count, positives


def search_validation_thresholds(model, data, *, input_size: int, batch_size: int, fbeta: float,
                                 objective: str, multiclass: bool = False):
    """Per-label thresholds of `model` as it is now -> (thresholds [L], metrics at them).

    One pass over the validation split on one device, no loss. Export calls
    it with the weights it writes, so the thresholds it serves were searched
    on exactly those weights (not on the raw model, nor on another epoch).
    """
    @tf.function(input_signature=[tf.TensorSpec([None, input_size, input_size, 3], tf.float32)])
    def probabilities(images):
        logits = model(images, training=False)
        return tf.nn.softmax(logits) if multiclass else tf.sigmoid(logits)

    evaluator = MultiLabelEvaluator(data.num_labels, beta=fbeta, label_names=data.label_names)
    feed_validation(evaluator, lambda images, labels: (probabilities(images).numpy(), None),
                    data, input_size, batch_size)
    thresholds = evaluator.search_thresholds(objective)
    return thresholds, evaluator.result(thresholds)


def _beta_name(beta: float) -> str:
    return str(int(beta)) if float(beta).is_integer() else str(beta)


def _label_table(prefix, names, metrics, thresholds, positives, b, objective) -> List[str]:
    """One line per label: val positives, threshold, precision, recall, F-beta, F@0.5, AUC.

    The header names the search objective: under "samples" a rare label's
    threshold can leave its own F-beta at 0, which reads as a bug otherwise.
    """
    width = max(8, max(len(n) for n in names))
    head = (f"  {'label':<{width}} {'pos':>5} {'thr':>5} {'prec':>6} {'recall':>6} "
            f"{'F' + b:>6} {'F' + b + '@.5':>7} {'AUC':>6}")
    lines = [f"{prefix} per label (F{b} at thresholds searched on {prefix} for "
             f"{_OBJECTIVE_TEXT.get(objective, objective).format(b=b)} "
             f"(--threshold_objective={objective}); F{b}@.5 at 0.5):", head]
    for i, n in enumerate(names):
        lines.append(
            f"  {n:<{width}} {int(positives[i]):>5d} {thresholds[i]:>5.2f} "
            f"{metrics[f'precision/{n}']:>6.3f} {metrics[f'recall/{n}']:>6.3f} "
            f"{metrics[f'f{b}/{n}']:>6.3f} {metrics[f'f{b}_at_0.5/{n}']:>7.3f} "
            f"{metrics[f'auc/{n}']:>6.3f}")
    return lines


def _class_table(prefix, names, iou: ConfusionMatrixIoU) -> List[str]:
    """One line per class: share of label pixels, share of predicted pixels, IoU."""
    cm = iou.confusion_matrix.astype(np.float64)
    total = max(cm.sum(), 1.0)
    per_class = iou.per_class_iou()
    width = max(10, max(len(n) for n in names))
    lines = [f"{prefix} per class (pixel shares; IoU = TP / (TP + FP + FN)):",
             f"  {'class':<{width}} {'share':>6} {'pred':>6} {'IoU':>6}"]
    for i, n in enumerate(names):
        lines.append(f"  {n:<{width}} {cm[i].sum() / total:>6.3f} {cm[:, i].sum() / total:>6.3f} "
                     f"{per_class[i]:>6.3f}")
    return lines


def _argmax_collapse(iou: ConfusionMatrixIoU, share: float = 0.999) -> List[str]:
    """Warns when (nearly) every pixel is predicted as one class that the labels are not."""
    cm = iou.confusion_matrix.astype(np.float64)
    total = cm.sum()
    if not total:
        return []
    predicted, labelled = cm.sum(axis=0) / total, cm.sum(axis=1) / total
    top = int(np.argmax(predicted))
    if predicted[top] >= share and labelled[top] < share:
        name = iou.class_names[top]
        return [f"{predicted[top]:.1%} of pixels are predicted as '{name}' (it covers "
                f"{labelled[top]:.1%} of them) — the model learnt the majority class; "
                f"{_SEG_REMEDY}"]
    return []
