"""The run manifest: what a model_dir's saved state depends on, checked on every resume.

A checkpoint is only name-keyed tensors; whether they mean the same thing
in the run that reads them depends on settings the tensors do not carry
(the label order, the optimizer that wrote the slots, the batch the data
position counts in). `manifest.json` records those settings, flat and keyed
by the flag a user types, after the run's config was validated and its
model built; a resume compares it with the request and sorts each change:

* STATE: the saved state would mean something else. An error naming the
  flag unless `--allow_changed=<flag>` opts in, and then the state it
  affects starts fresh (and the log says so) or, where nothing needs to
  start fresh, the run continues and says how.
* FIXED: the run cannot continue in this model_dir at all (another
  architecture); the error points to a new --model_dir or a warm start.
* Everything else is listed and accepted (epochs, learning rate, loss...).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from engine.config import ALLOWABLE_CHANGES, Config, ConfigError

FILENAME = "manifest.json"
FORMAT = 1

# Changes that make the saved state mean something else, with what opting in does.
STATE = {
    "optimizer": "optimizer slots and step counts start fresh (the old kind's slots are ignored)",
    "labels": "the head's logits layer starts fresh (its rows belonged to other labels)",
    "task": "the head's logits layer starts fresh (its outputs meant something else)",
    "input_size": "the weights continue at the new input size",
    "batch_size": ("the schedule and the epoch position keep counting batches, now of the "
                   "new size"),
}
assert set(STATE) == set(ALLOWABLE_CHANGES)
# Changes of architecture: the checkpoints cannot hold this run's model.
FIXED = ("backbone", "seg_model", "unet_depth", "unet_filters")
# Accepted changes that need a word on what they do (or do not do) on resume.
NOTES = {
    "weights": "no effect on resume: the checkpoint's weights are used",
    "init_checkpoint": "no effect on resume: the checkpoint's weights are used",
    "ema_decay": "",  # on/off is explained by the restore (engine/restore.py)
    "seed": "the rest of this epoch is drawn in another order (some examples may repeat)",
    "steps_per_epoch": "the schedule's length changes with it",
    "epochs": "the schedule's length changes with it",
    # Both decide whether the backbone's optimizer has one group or one per
    # block (freeze.per_block_groups). Not STATE: no saved tensor means
    # something else; a resume that regroups finds no slots under the new
    # group names, so those start fresh (the restore line names them), and
    # a change that keeps the grouping (0.8 -> 0.7) only changes learning rates.
    "layer_lr_decay": ("the backbone blocks' learning rates change; if the backbone's "
                       "optimizer goes from one group to one per block or back, their slots "
                       "start fresh"),
    "unfreeze_schedule": ("the phases follow the new schedule from this epoch on; if the "
                          "backbone's optimizer goes from one group to one per block or back, "
                          "their slots start fresh"),
    "calibrate_bn_steps": ("no effect on resume: BN statistics are calibrated once, at the "
                           "start of a fresh run (train/bn_calibrated)"),
}
# Settings recorded since FORMAT 1 was first written, with the value a run
# that did not record them had: an older manifest then does not differ.
ADDED = {"layer_lr_decay": 1.0, "unfreeze_schedule": "", "calibrate_bn_steps": 0,
         "lr_restart_at_unfreeze": False}


def describe(config: Config, *, label_names: Sequence[str], replicas: int,
             workers: int) -> Dict[str, object]:
    """The manifest of a run: flag name -> value (JSON types only)."""
    m, o, f, lo, t = config.model, config.optimizer, config.freeze, config.loss, config.train
    out: Dict[str, object] = {"task": m.task}
    if m.task == "segmentation":
        out.update(seg_model=m.seg_model, unet_depth=m.unet_depth, unet_filters=m.unet_filters)
    else:
        out["backbone"] = m.backbone
    out.update(
        input_size=m.input_size, labels=list(label_names), weights=m.weights,
        init_checkpoint=t.init_checkpoint, dropout=m.dropout, sync_bn=m.sync_bn,
        bn_momentum=m.bn_momentum, optimizer=o.name, learning_rate=o.learning_rate,
        momentum=o.momentum, weight_decay=o.weight_decay, lr_schedule=o.schedule,
        warmup_epochs=o.warmup_epochs, backbone_lr_multiplier=o.backbone_lr_multiplier,
        layer_lr_decay=o.layer_lr_decay, unfreeze_at=f.unfreeze_at,
        unfreeze_layers=f.unfreeze_layers, unfreeze_schedule=f.unfreeze_schedule,
        freeze_bn=f.freeze_bn,
        loss=lo.loss, pos_weight=lo.pos_weight, ema_decay=t.ema_decay,
        mixed_precision=t.mixed_precision, strategy=t.strategy, replicas=replicas,
        workers=workers, batch_size=t.batch_size, steps_per_epoch=t.steps_per_epoch,
        epochs=t.epochs, seed=t.seed, data_dir=config.data.data_dir,
        calibrate_bn_steps=t.calibrate_bn_steps, lr_restart_at_unfreeze=o.restart_at_unfreeze)
    return out


def read(model_dir: str) -> Optional[Dict[str, object]]:
    """The saved manifest, or None when the model_dir has none (a run of an older tapeworks).

    A manifest that cannot be parsed is a ConfigError naming the file: a
    resume must not go on without knowing what the checkpoints mean.
    """
    path = os.path.join(model_dir, FILENAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
        return dict(data["settings"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is unreadable ({type(e).__name__}); restore it from a "
                          f"copy or delete it to resume without checking settings") from None


def write(model_dir: str, settings: Dict[str, object]) -> None:
    """Writes manifest.json atomically (a kill -9 leaves the old one or the new one)."""
    os.makedirs(model_dir, exist_ok=True)
    text = json.dumps({"format": FORMAT, "settings": settings}, indent=1, sort_keys=True)
    fd, scratch = tempfile.mkstemp(dir=model_dir, prefix=".manifest-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
        os.chmod(scratch, 0o644)
        os.replace(scratch, os.path.join(model_dir, FILENAME))
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)


def changes(saved: Dict[str, object], requested: Dict[str, object]) -> List[Tuple[str, object, object]]:
    """(flag, saved value, requested value) for every setting that differs.

    A setting of ADDED that a manifest lacks counts as its old default.
    """
    keys = sorted(set(saved) | set(requested))
    saved = {k: saved.get(k, ADDED.get(k)) for k in keys}
    return [(k, saved[k], requested.get(k)) for k in keys if saved[k] != requested.get(k)]


def check(saved: Dict[str, object], requested: Dict[str, object], *,
          allow_changed: Sequence[str], model_dir: str) -> Tuple[List[str], List[str]]:
    """Compares a resume's settings with the saved ones.

    Returns (lines for the log, the STATE flags whose change the user
    allowed: the caller makes their state start fresh). Raises ConfigError
    naming the flags when a change is not allowed.
    """
    found = changes(saved, requested)
    fixed = [(k, a, b) for k, a, b in found if k in FIXED]
    if fixed:
        k, a, b = fixed[0]
        raise ConfigError(
            f"--{k} changed from {_show(a)} to {_show(b)}, but the checkpoints in "
            f"--model_dir={model_dir} hold a {_show(a)} model; use another --model_dir "
            f"(with --init_checkpoint={model_dir} to warm start what fits)")
    refused = [(k, a, b) for k, a, b in found if k in STATE and k not in allow_changed]
    if refused:
        what = ", ".join(f"--{k} {_show(a)} -> {_show(b)}" for k, a, b in refused)
        names = ",".join(k for k, _, _ in refused)
        raise ConfigError(
            f"resuming --model_dir={model_dir} with changed settings that change what its "
            f"checkpoints mean ({what}); go back to the saved values, use another --model_dir, "
            f"or pass --allow_changed={names} to continue anyway")
    lines, allowed = [], []
    for k, a, b in found:
        line = f"  --{k}: {_show(a)} -> {_show(b)}"
        if k in STATE:
            allowed.append(k)
            line += f" (allowed: {STATE[k]})"
        elif NOTES.get(k):
            line += f" ({NOTES[k]})"
        lines.append(line)
    if lines:
        lines.insert(0, f"settings changed since {os.path.join(model_dir, FILENAME)} was written:")
    return lines, allowed


def _show(value) -> str:
    if isinstance(value, list):
        shown = ",".join(map(str, value[:6])) + (",..." if len(value) > 6 else "")
        return f"[{shown}] ({len(value)})"
    return "unset" if value is None else str(value)
