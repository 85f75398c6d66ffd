"""What a person sees and keeps: a tqdm bar, one line per epoch, a CSV and TensorBoard.

Everything here runs on the host between traced calls, with plain Python
numbers, so writing summaries never adds ops to the training graph.
"""
from __future__ import annotations

import csv
import os
import sys
from typing import Callable, Dict, List, Optional

import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tqdm import tqdm

# TF 2.21 no longer depends on the tensorboard package, and without it
# tf.summary.scalar raises TBNotInstalledError. tf.summary.write is core TF;
# with the "scalars" plugin metadata TensorBoard shows the result as scalars.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")).SerializeToString()


class RunLog:
    def __init__(self, model_dir: str, *, progress: bool = True, enabled: bool = True):
        self.model_dir = model_dir
        self.progress = progress
        self.enabled = enabled  # False on non-chief workers
        # Callables that also get every line printed (a tool or test keeping the log).
        self.listeners: List[Callable[[str], None]] = []
        self.csv_path = os.path.join(model_dir, "metrics.csv")
        self._writers: Dict[str, object] = {}
        self._bar: Optional[tqdm] = None

    def writer(self, name: str):
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(os.path.join(self.model_dir, name))
        return self._writers[name]

    def scalars(self, name: str, values: Dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        with self.writer(name).as_default():
            for key, value in values.items():
                tf.summary.write(key, tf.constant(value, tf.float32), step=step,
                                 metadata=_SCALAR_METADATA)

    def start_epoch(self, epoch: int, epochs: int, total: int, initial: int, phase: str) -> None:
        # No tqdm rate: it counts tracing and evaluation too and disagreed with
        # the engine's steps_per_sec, the only rate shown (in the postfix).
        self._bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs} ({phase})",
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
                         unit="step", leave=False, dynamic_ncols=True,
                         disable=None if self.progress and self.enabled else True)

    def advance(self, steps: int, loss: float, steps_per_sec: float) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            self._bar.set_postfix(loss=f"{loss:.4f}", steps_per_sec=f"{steps_per_sec:.1f}")

    def end_epoch(self, epoch: int, row: Dict[str, float], summary: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self.enabled or not summary:
            return
        self.line(f"epoch {epoch + 1}: " + "  ".join(_fmt(k, v) for k, v in row.items()))
        self._append_csv(epoch, row)

    def line(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()
            for listener in self.listeners:
                listener(text)

    def _append_csv(self, epoch: int, row: Dict[str, float]) -> None:
        """Rewrites rows of this epoch and later (a resumed run repeats them)."""
        rows = []
        if os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < epoch + 1]
        rows.append({"epoch": epoch + 1, **row})
        fields = list(dict.fromkeys(k for r in rows for k in r))
        tmp = self.csv_path + ".tmp"
        try:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)
            os.replace(tmp, self.csv_path)
        finally:  # a failed write (a full disk) leaves the old file and no temporary one
            if os.path.exists(tmp):
                os.remove(tmp)

    def close(self) -> None:
        for w in self._writers.values():
            w.flush()


def _fmt(key, value):
    return f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
