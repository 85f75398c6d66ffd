"""Where a run starts from: its own newest checkpoint, a warm start, or fresh.

    restore_run(parts, starting=...) -> Restored(line, path)

A resume reads the newest readable checkpoint by key (engine/state.py)
after comparing the request with the model_dir's manifest
(engine/manifest.py): a change that changes what the saved state means is
refused unless allowed, and then the state it affects starts fresh. State the
checkpoint did not have (EMA turned on, a fresh head) starts from the
restored weights, never from construction values. A fresh start sets the
head bias to the label prior and starts the EMA shadows there; a warm start
reads model weights only (engine/warm_start.py). A training run that would
start fresh over an earlier run's results needs --overwrite (engine/run_dir.py).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import List, Optional, Sequence

import numpy as np

from engine import manifest, run_dir
from engine.state import StateError, checkpoint_is_readable, existing_checkpoints
from engine.warm_start import count_weights_file, warm_start


@dataclasses.dataclass
class Restored:
    line: str  # what happened, for the log
    path: Optional[str] = None  # the checkpoint resumed from (None: fresh or warm start)


def restore_run(parts, *, starting: bool = False) -> Restored:
    """Resumes from the newest readable checkpoint, else warm starts, else starts fresh.

    starting: a training run is taking model_dir over; a fresh start over
    an earlier run's results then needs --overwrite, which moves them aside.
    """
    c = parts.config
    skipped = []
    for path in existing_checkpoints(os.path.join(parts.model_dir, "checkpoints")):
        if not checkpoint_is_readable(path):
            skipped.append(path)
            continue
        note = "".join(f"WARNING: checkpoint {p} is unreadable (cut short?); skipped. "
                       for p in skipped)
        lines = _resume(parts, path)
        lines[-1] = note + lines[-1]
        return Restored("\n".join(lines), path)
    if skipped and not (starting and c.train.overwrite):
        names = ", ".join(os.path.basename(p) for p in skipped)
        raise StateError(f"no readable checkpoint in {parts.model_dir}/checkpoints "
                         f"({len(skipped)} unreadable: {names}); to start fresh, train with "
                         f"--overwrite (it moves them aside) or use another --model_dir")
    moved = None
    if starting:
        moved = run_dir.prepare_fresh_start(parts.model_dir, overwrite=c.train.overwrite,
                                            move=parts.is_chief, shown=c.train.model_dir)
    note = f" (the earlier run's files were moved to {moved})" if moved else ""
    init_head_bias_to_prior(parts)
    if parts.ema is not None:
        parts.ema.reset()  # the shadows start from the weights the run starts from
    weights = _weights_note(parts)
    if c.train.init_checkpoint:
        return Restored(weights + "warm start: " + _warm_start(parts) + note)
    return Restored(weights + "fresh start" + note)


def _resume(parts, path: str) -> List[str]:
    """Reads checkpoint `path` after checking the settings; returns the log lines."""
    notes, fresh, fallbacks = _check_settings(parts)
    report = parts.state.restore(path, exclude=fresh, fallbacks=fallbacks)
    lost = [k for k in report.missing + report.shape_mismatch
            if k.startswith("model/") and not _selected_by(k, fresh)]
    if lost and not parts.config.train.allow_partial_restore:
        raise StateError(
            f"checkpoint {path} does not fit this model ({len(lost)} model tensors "
            f"missing or of another shape, e.g. {lost[0]}); use another --model_dir "
            f"or pass --allow_partial_restore")
    notes += _start_unrestored_state(parts, report, fresh)
    return notes + ["resumed: " + report.summary()]


def _check_settings(parts):
    """Compares this resume's settings with the model_dir's manifest.

    Returns (lines for the log, key patterns of state that must start fresh
    because the user allowed a change of its meaning, fallback keys for a
    checkpoint of an older naming). Raises ConfigError for a change that is
    not allowed.
    """
    saved = manifest.read(parts.model_dir)
    if saved is None:
        return _legacy_settings(parts)
    lines, allowed = manifest.check(saved, parts.settings,
                                    allow_changed=parts.config.train.allow_changed,
                                    model_dir=parts.model_dir)
    fresh = []
    if "optimizer" in allowed:
        fresh.append("optimizer/*")
    if "labels" in allowed or "task" in allowed:
        fresh += ["model/head/logits/*", "ema/head/logits/*", "optimizer/*/head/logits/*"]
    return lines, fresh, {}


def _legacy_settings(parts):
    """A model_dir from before manifest.json: slot keys had no optimizer kind.

    Its flags.txt says which optimizer wrote the slots; only when that is the
    one requested are they read (under their old keys).
    """
    lines = [f"note: {parts.model_dir} has no {manifest.FILENAME} (an older tapeworks); "
             f"settings cannot be compared with the saved run"]
    old = _flag_in_flagfile(os.path.join(parts.model_dir, "flags.txt"), "optimizer")
    kind = parts.config.optimizer.name
    if old != kind:
        lines.append(f"optimizer slots start fresh: the checkpoints do not say their "
                     f"optimizer was --optimizer={kind}")
        return lines, [], {}
    fallbacks = {}
    for name, group in parts.groups.items():
        prefix = f"optimizer/{name}/"
        for key in group.state():
            fallbacks[prefix + key] = prefix + key[len(kind) + 1:]
    return lines, [], fallbacks


def _start_unrestored_state(parts, report, fresh: Sequence[str]) -> List[str]:
    """EMA shadows the checkpoint did not have start from the restored weights.

    A shadow keeps its construction value otherwise (EMA turned on for a
    resumed run, or a head that starts fresh): an average of weights the run
    never had.
    """
    lines = []
    if "train/bn_calibrated" in report.missing:  # a run from before calibration existed:
        parts.counters.bn_calibrated.assign(-1)  # never calibrated mid-run
    if any(k.startswith("model/head/logits/") for k in fresh):
        init_head_bias_to_prior(parts)
        lines.append("the head's logits layer starts fresh (--allow_changed)")
    if parts.ema is not None:
        missing = {k[len("ema/"):] for k in report.missing + report.excluded
                   if k.startswith("ema/")}
        if missing:
            parts.ema.reset(only_keys=missing)
            lines.append(f"EMA: {len(missing)} shadows were not in the checkpoint; they "
                         f"start from the restored weights")
    return lines


def init_head_bias_to_prior(parts) -> None:
    """Starts each label's logit at its training prevalence.

    With two labels at 90% and most under 10%, a zero bias starts every label
    at p=0.5 and spends the first epochs learning the priors; this starts the
    loss at the prevalence baseline instead.
    """
    if parts.config.model.task != "multilabel":
        return
    p = np.clip(parts.data.label_prevalence, 1e-4, 1 - 1e-4)
    bias = parts.model.get_layer("head").get_layer("logits").bias
    bias.assign(np.log(p / (1 - p)).astype(np.float32))


def _warm_start(parts) -> str:
    """Model weights only, from any checkpoint or Keras file engine/warm_start.py reads."""
    t = parts.config.train
    report = warm_start(t.init_checkpoint, model=parts.model, state=parts.state, keys=parts.keys,
                        include=t.init_include, exclude=t.init_exclude,
                        min_fraction=t.init_min_fraction, allow_partial=t.allow_partial_restore)
    if parts.ema is not None:
        parts.ema.reset()
    return report.summary()


def _weights_note(parts) -> str:
    """What --weights=FILE gave the backbone, counted: Keras itself only says "loaded"."""
    weights = parts.config.model.weights
    if weights in (None, "imagenet"):
        return ""
    report = count_weights_file(weights, parts.model.get_layer("backbone"),
                                allow_empty=parts.config.train.allow_partial_restore)
    return f"--weights: {report.summary()}; "


def _selected_by(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _flag_in_flagfile(path: str, name: str) -> Optional[str]:
    """The value of --name in an absl flagfile, or None (no file, no such line)."""
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"--{name}="):
            return line.split("=", 1)[1]
    return None
