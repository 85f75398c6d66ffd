"""The training state under stable, readable names, saved and restored by name.

Why not `tf.train.Checkpoint(model=model, optimizer=optimizer)`: on TF 2.21 with
Keras 3 that keys state by position (`model/_operations/1/_kernel`,
`optimizer/_variables/2`), so a checkpoint written while the backbone was
frozen restores into an unfrozen model with a shape error or, worse, into the
wrong layer. Here every variable gets a key from the layer nesting
(`model/backbone/conv2d/kernel`, `optimizer/head/adam/head/logits/kernel/momentum`),
the checkpoint is written as nested dicts of those keys (so
`tf.train.list_variables` shows them), and restore reads tensors by key and
reports what matched, what was missing, what was unused and what had the
wrong shape.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from engine.variables import as_tf_variable
from engine.run_dir import list_checkpoints

_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


class StateError(ValueError):
    """A checkpoint problem a user can act on; one line."""


def model_variable_keys(model) -> Dict[int, str]:
    """Maps id(variable) -> key built from the layer nesting.

    Children are visited before their parent claims what is left, so a
    variable is named after the innermost layer that owns it. Keys are
    checked unique: `variable.path` alone is not, when two nested submodels
    hold layers of the same name.
    """
    keys: Dict[int, str] = {}

    def walk(layer, prefix):
        for child in getattr(layer, "_layers", []):
            walk(child, f"{prefix}{child.name}/")
        for v in layer.variables:  # includes seed-generator state (dropout RNG)
            keys.setdefault(id(v), prefix + _leaf_name(v))

    walk(model, "")
    _check_unique(keys.values(), "model")
    return keys


def _leaf_name(variable) -> str:
    name = variable.name.split(":")[0]
    return name.rsplit("/", 1)[-1]


def _check_unique(keys: Iterable[str], what: str):
    seen = set()
    for k in keys:
        if k in seen:
            raise StateError(f"two {what} variables share the state key '{k}'; rename a layer")
        seen.add(k)


@dataclasses.dataclass
class RestoreReport:
    """What a restore did, by key."""
    path: str
    matched: List[str] = dataclasses.field(default_factory=list)
    missing: List[str] = dataclasses.field(default_factory=list)  # initialized fresh
    unused: List[str] = dataclasses.field(default_factory=list)  # in file, not in run
    shape_mismatch: List[str] = dataclasses.field(default_factory=list)  # skipped
    excluded: List[str] = dataclasses.field(default_factory=list)  # by include/exclude

    def summary(self) -> str:
        return "; ".join([f"restored {len(self.matched)} tensors from {self.path}",
                          *self.details()])

    def details(self) -> List[str]:
        """One part per non-empty list: its count and its first few names."""
        parts = []
        for label, keys in (("missing from checkpoint (fresh)", self.missing),
                            ("in checkpoint but unused (ignored)", self.unused),
                            ("wrong shape (skipped)", self.shape_mismatch),
                            ("excluded by include/exclude (kept)", self.excluded)):
            if keys:
                shown = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        return parts


class TrainingState:
    """A flat registry key -> tf.Variable with save and tolerant restore."""

    def __init__(self):
        self._vars: Dict[str, tf.Variable] = {}

    def add(self, key: str, variable) -> None:
        if key in self._vars:
            raise StateError(f"state key '{key}' registered twice")
        for other in self._vars:
            if other.startswith(key + "/") or key.startswith(other + "/"):
                raise StateError(f"state key '{key}' collides with '{other}'")
        self._vars[key] = variable

    def add_all(self, prefix: str, keyed: Dict[str, object]) -> None:
        for key, v in keyed.items():
            self.add(f"{prefix}/{key}", v)

    @property
    def keys(self) -> List[str]:
        return list(self._vars)

    def __getitem__(self, key):
        return self._vars[key]

    def checkpoint(self) -> tf.train.Checkpoint:
        """A tf.train.Checkpoint whose object graph is the key tree."""
        tree: dict = {}
        for key, v in self._vars.items():
            node = tree
            *parents, leaf = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = as_tf_variable(v)
        return tf.train.Checkpoint(**tree)

    def restore(self, path: str, *, include: Sequence[str] = (),
                exclude: Sequence[str] = (), only_prefixes: Sequence[str] = (),
                fallbacks: Optional[Dict[str, str]] = None,
                assign: bool = True) -> RestoreReport:
        """Assigns every state variable whose key is in the checkpoint at path.

        include/exclude are fnmatch patterns on the full keys (for example
        `model/backbone/*`); only_prefixes limits which groups take part at
        all (a warm start restores only `model/`). fallbacks: key -> the key
        to read instead when the file lacks the key itself (a checkpoint
        written under an older naming). assign=False only reports,
        so a caller can refuse a poor match before any variable changes.
        """
        reader = _reader(path)
        shapes = reader.get_variable_to_shape_map()
        in_file = {k[:-len(_SUFFIX)]: k for k in shapes if k.endswith(_SUFFIX)}
        fallbacks = fallbacks or {}
        report = RestoreReport(path=path)
        read_keys = set()
        for key, var in self._vars.items():
            if only_prefixes and not key.startswith(tuple(only_prefixes)):
                continue
            if not _selected(key, include, exclude):
                report.excluded.append(key)
                continue
            file_key = in_file.get(key) or in_file.get(fallbacks.get(key, ""))
            if file_key is None:
                report.missing.append(key)
                continue
            read_keys.add(file_key[:-len(_SUFFIX)])
            if tuple(shapes[file_key]) != tuple(var.shape):
                report.shape_mismatch.append(
                    f"{key} {tuple(shapes[file_key])}->{tuple(var.shape)}")
                continue
            if assign:
                var.assign(reader.get_tensor(file_key).astype(
                    tf.as_dtype(var.dtype).as_numpy_dtype))
            report.matched.append(key)
        used = set(self._vars) | read_keys
        report.unused = sorted(k for k in in_file if k not in used and k != "save_counter"
                               and (not only_prefixes or k.startswith(tuple(only_prefixes))))
        return report

    def values(self) -> Dict[str, np.ndarray]:
        return {k: np.array(v.numpy()) for k, v in self._vars.items()}


def _selected(key: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(key, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(key, p) for p in exclude)


def _reader(path: str):
    try:
        return tf.train.load_checkpoint(path)
    except (tf.errors.OpError, ValueError) as e:
        raise StateError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


def list_keys(path: str) -> Dict[str, tuple]:
    """Checkpoint keys (as the engine names them) -> shape."""
    return {name[:-len(_SUFFIX)]: tuple(shape)
            for name, shape in tf.train.list_variables(path) if name.endswith(_SUFFIX)}


def checkpoint_is_readable(path: str) -> bool:
    """True when every tensor of the checkpoint at path can be read back.

    A save cut short by kill -9 can leave an index whose data file is
    truncated; reading every tensor is the only way to be sure.
    """
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False


def existing_checkpoints(directory: str) -> List[str]:
    """Checkpoint prefixes in directory, newest first.

    Both those the state file lists and every `ckpt-*.index` on disk
    (engine/run_dir.py): a deleted or garbled state file must not hide
    checkpoints, or a fresh start would overwrite them.
    """
    return list_checkpoints(directory)
