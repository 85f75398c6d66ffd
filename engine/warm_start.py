"""Warm start: other people's weights into the engine's name-keyed model state.

A warm start only ever writes the model's weights (`model/` keys of the
TrainingState; never optimizer slots, EMA shadows or counters), and it
always says, as counts and first names, what it matched, what stayed fresh
(missing), what in the file went unused, what had another shape and what
include/exclude kept out. When it restores nothing, or less than
`min_fraction` of the selected model tensors, it raises StateError (one
line) and leaves the model as it was, unless the caller allows a partial
start: a warm start that silently restores 0 of 22 tensors and trains from
scratch is the failure this module exists to prevent.

Four kinds of file, told apart by what they contain, not by their name:

1. tapeworks checkpoints (a model_dir, its checkpoints/ dir or a prefix):
   by key, through TrainingState.restore.
2. TF2 object-graph checkpoints of Keras models
   (`tf.train.Checkpoint(model=m, optimizer=opt).save(...)`): the keys are
   positional and a variable is stored once, under the first path that
   reaches it, often `optimizer/_trainable_variables/3`. So the keys are not
   matched as strings: the checkpoint's own object graph is walked from the
   model's node, which still lists every layer's edge to its variables, and
   the engine model is walked the same way (tf.train.TrackableView). Both
   walks give, in layer order, the variables each layer owns ("kernel",
   "gamma", ...); the two sequences of layers are aligned (same leaf names,
   shapes scored) and each aligned pair is matched leaf by leaf.
3. Keras `.weights.h5` / `.keras` / legacy `.h5` files: Keras' own loader
   with skip_mismatch, into weights first set to NaN, so the weights that
   are no longer NaN are exactly the ones the file provided (Keras itself
   only says "loaded"). The others get their values back.
4. Name-based checkpoints (TF1 Saver, `tf.train.Checkpoint(**{name: var})`,
   keys like `conv2d/kernel` or `block1_conv1/kernel:0`): matched by the
   longest unique suffix of layer name + leaf name, at least two parts.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import io
import os
import re
import warnings
import zipfile
from collections import defaultdict
from typing import Callable, Dict, List, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from engine.state import RestoreReport, StateError, TrainingState, model_variable_keys

DEFAULT_MIN_FRACTION = 0.5
KERAS_FILE_SUFFIXES = (".h5", ".keras")
_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_NOT_WEIGHTS = ("save_counter", "global_step", _GRAPH_KEY)
_LAYER_LISTS = ("_operations", "_layers", "_self_tracked_trackables")
_KERAS2_LAYER = re.compile(r"^layer(_with_weights)?-\d+$")


@dataclasses.dataclass
class WarmStartReport(RestoreReport):
    """A RestoreReport that also says what kind of file it read and of what."""
    source: str = ""  # "tapeworks checkpoint", "Keras object graph under 'model'", ...
    scope: str = "model"  # what the counts are of: "model" or "backbone"
    matched_elements: int = 0  # parameters (array elements) in the matched tensors
    selected_elements: int = 0  # ... in all selected tensors

    @property
    def selected(self) -> int:
        """Tensors this warm start tried to fill (include/exclude applied)."""
        return len(self.matched) + len(self.missing) + len(self.shape_mismatch)

    @property
    def fraction(self) -> float:
        return len(self.matched) / self.selected if self.selected else 0.0

    @property
    def element_fraction(self) -> float:
        return self.matched_elements / self.selected_elements if self.selected_elements else 0.0

    def weigh(self, variables: Dict[str, object]) -> None:
        """Fills the element counts from key -> variable of the selected tensors."""
        def size(keys):
            return sum(int(np.prod(variables[k].shape)) for k in keys if k in variables)
        self.matched_elements = size(self.matched)
        self.selected_elements = size([*self.matched, *self.missing,
                                       *(m.split(" ")[0] for m in self.shape_mismatch)])

    def counts(self) -> str:
        return (f"{len(self.matched)} of {self.selected} {self.scope} tensors matched "
                f"({self.element_fraction:.0%} of their parameters), {len(self.missing)} missing, "
                f"{len(self.shape_mismatch)} wrong shape, {len(self.unused)} unused, "
                f"{len(self.excluded)} excluded")

    def summary(self) -> str:
        head = (f"restored {len(self.matched)} of {self.selected} {self.scope} tensors "
                f"({self.element_fraction:.0%} of their parameters) from {self.path} "
                f"({self.source})")
        return "; ".join([head, *self.details()])


@dataclasses.dataclass
class _Plan:
    """A report, and how to carry it out or take it back once it is judged."""
    report: WarmStartReport
    apply: Callable[[], None] = lambda: None
    undo: Callable[[], None] = lambda: None


def warm_start(path: str, *, model, state: TrainingState, keys: Dict[int, str],
               include: Sequence[str] = (), exclude: Sequence[str] = (),
               min_fraction: float = DEFAULT_MIN_FRACTION,
               allow_partial: bool = False) -> WarmStartReport:
    """Reads the weights in `path` into `model` and returns what it did.

    keys maps id(variable) -> key as engine.state.model_variable_keys gives
    it; include/exclude are fnmatch patterns on the state keys
    (`model/backbone/*`). Raises StateError, naming path and the counts,
    when nothing or less than min_fraction of the selected tensors matched
    (unless allow_partial), and when an include/exclude pattern selects no
    model tensor; the model is unchanged then.
    """
    candidates = {"model/" + keys[id(v)]: v for v in model.weights if id(v) in keys}
    selected, excluded = _select(candidates, include, exclude)
    plan = _plan(path, model=model, state=state, include=include, exclude=exclude,
                 selected=selected, excluded=excluded)
    report = plan.report
    report.weigh(candidates)
    shortfall = _shortfall(report, min_fraction)
    if shortfall and not allow_partial:
        plan.undo()
        raise StateError(f"--init_checkpoint={path} does not fit this model ({report.source}): "
                         f"{report.counts()}; {shortfall}; pass --allow_partial_restore to "
                         f"start anyway")
    plan.apply()
    return report


def count_weights_file(path: str, model, *, allow_empty: bool = False) -> WarmStartReport:
    """Counts which of model's weights the Keras weights file at path provides.

    For --weights=FILE: models/ loads the file while building the backbone
    and says nothing; this loads it again into NaN-filled weights to count,
    then puts every value back as it was (so nothing the build did, such as
    EfficientNet's variance fold, is undone). Zero matched raises StateError
    unless allow_empty.
    """
    keys = model_variable_keys(model)
    variables = {keys[id(v)]: v for v in model.weights}
    report = WarmStartReport(path=path, source="Keras weights file", scope=model.name)
    restore = _snapshot(model.variables)
    try:
        loaded = _load_keras_file(path, model, variables, flag="--weights")
    finally:
        restore()
    report.matched = [k for k in variables if k in loaded]
    report.missing = [k for k in variables if k not in loaded]
    report.unused = _unused_file_tensors(path, [variables[k] for k in report.matched])
    report.weigh(variables)
    if not report.matched and not allow_empty:
        raise StateError(f"--weights={path} does not fit the {model.name} ({report.counts()}); "
                         f"pass --allow_partial_restore to start anyway")
    return report


# ------------------------------------------------------------- selection
def _select(candidates: Dict[str, object], include: Sequence[str],
            exclude: Sequence[str]) -> Tuple[Dict[str, object], List[str]]:
    """Splits candidates by the patterns; a pattern that selects nothing is an error."""
    example = next(iter(candidates), "model/...")
    for flag, patterns in (("--init_include", include), ("--init_exclude", exclude)):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(k, p) for k in candidates):
                raise StateError(f"{flag}={p} selects no model tensor (keys look like "
                                 f"{example}; patterns are fnmatch on the whole key)")
    selected, excluded = {}, []
    for key, var in candidates.items():
        if (include and not any(fnmatch.fnmatchcase(key, p) for p in include)) or \
                any(fnmatch.fnmatchcase(key, p) for p in exclude):
            excluded.append(key)
        else:
            selected[key] = var
    return selected, excluded


def _shortfall(report: WarmStartReport, min_fraction: float) -> str:
    """Why the match is too poor to train from, or "".

    Both the share of tensors and the share of their parameters must reach
    min_fraction: an unrelated net can supply many small BatchNorm vectors
    of the right length (13 of tiny_cnn's 22 tensors from MobileNetV2) but
    hardly ever the kernels that hold the parameters (2% there).
    """
    if not report.matched:
        return "nothing to warm start from"
    if min(report.fraction, report.element_fraction) < min_fraction:
        return f"below --init_min_fraction={min_fraction:g}"
    return ""


# ------------------------------------------------------- which kind of file
def _plan(path: str, *, model, state, include, exclude, selected, excluded) -> _Plan:
    """Picks the reader by what the file holds and plans the restore."""
    if path.endswith(KERAS_FILE_SUFFIXES):
        if not os.path.isfile(path):
            raise StateError(f"--init_checkpoint={path} does not exist")
        return _plan_keras_file(path, model, selected, excluded)
    prefix = _checkpoint_prefix(path)
    reader = _reader(path, prefix)
    shapes = reader.get_variable_to_shape_map()
    names = {_strip(k) for k in shapes}
    if "train/global_step" in names or any(k in names for k in selected):
        return _plan_tapeworks(prefix, state, include, exclude)
    graph = _object_graph(reader)
    if graph is not None and _has_keras_layers(graph):
        return _plan_object_graph(prefix, reader, graph, model, selected, excluded)
    return _plan_by_name(prefix, reader, shapes, selected, excluded)


def _checkpoint_prefix(path: str) -> str:
    """A model_dir or checkpoint dir means its newest checkpoint."""
    if not os.path.isdir(path):
        return path
    found = (tf.train.latest_checkpoint(os.path.join(path, "checkpoints"))
             or tf.train.latest_checkpoint(path))
    if not found:
        raise StateError(f"--init_checkpoint={path} is a directory without a checkpoint "
                         f"(neither it nor its checkpoints/ has a 'checkpoint' file)")
    return found


def _reader(path: str, prefix: str):
    try:
        return tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise StateError(f"--init_checkpoint={path} cannot be read as a checkpoint: "
                         f"{str(e).splitlines()[0]}") from None


def _strip(name: str) -> str:
    return name[:-len(_VALUE_SUFFIX)] if name.endswith(_VALUE_SUFFIX) else name


# ---------------------------------------------------- 1. tapeworks by key
def _plan_tapeworks(prefix: str, state: TrainingState, include, exclude) -> _Plan:
    def restore(assign):
        return state.restore(prefix, include=include, exclude=exclude,
                             only_prefixes=("model/",), assign=assign)
    got = restore(False)
    report = WarmStartReport(**dataclasses.asdict(got), source="tapeworks checkpoint")
    return _Plan(report, apply=lambda: restore(True))


def _assign(pairs: List[Tuple[object, Callable[[], np.ndarray]]]) -> Callable[[], None]:
    def apply():
        for var, value in pairs:
            var.assign(value().astype(tf.as_dtype(var.dtype).as_numpy_dtype))
    return apply


# ------------------------------------------- 2. Keras object-graph checkpoints
# A walk's result: owner path -> {leaf name: (attribute name, reference, shape)},
# in the order the walk met the owners (layer order). The reference is the
# checkpoint key (saved side) or the variable (live side).
Groups = Dict[Tuple[str, ...], Dict[str, Tuple[str, object, tuple]]]


def _object_graph(reader):
    if not reader.has_tensor(_GRAPH_KEY):
        return None
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_GRAPH_KEY))
    return graph


def _has_keras_layers(graph) -> bool:
    """True when some object holds a Keras layer list (Keras 3 or 2 models)."""
    return any(c.local_name in _LAYER_LISTS or _KERAS2_LAYER.match(c.local_name)
               for node in graph.nodes for c in node.children)


def _walk(root, children, variable, shape) -> Groups:
    """Depth first from root, each object once: the variables each object owns.

    An object owns a variable it holds under a name (`kernel`, `_kernel`,
    `moving_mean`); a variable held only in a list (`_trainable_variables/3`)
    belongs to whoever names it. Optimizers are skipped: their variables are
    slots, and the model's own edges reach every weight anyway.
    """
    groups: Groups = {}
    seen_objects, seen_variables = set(), set()

    def visit(node, path):
        kids = children(node)
        if any(name == "_iterations" for name, _, _ in kids):
            return  # an optimizer
        own = {}
        for name, ident, child in kids:
            ref = variable(child)
            if ref is not None and not name.isdigit() and ident not in seen_variables:
                seen_variables.add(ident)
                own[_leaf(name)] = (name, ref, shape(child))
        if own:
            groups[path] = own
        for name, ident, child in kids:
            if variable(child) is None and name != "optimizer" and ident not in seen_objects:
                seen_objects.add(ident)
                visit(child, path + (name,))

    visit(root, ())
    return groups


def _leaf(name: str) -> str:
    """`_kernel` (Keras 3 Dense), `kernel:0` (Keras 2 names) -> `kernel`."""
    return re.sub(r":\d+$", "", name).lstrip("_")


def _saved_groups(graph, shapes) -> Tuple[str, Groups]:
    """The checkpoint's model: the root attribute `model`, else the one owning most weights."""
    def children(i):
        return [(c.local_name, c.node_id, c.node_id) for c in graph.nodes[i].children]

    def variable(i):
        keys = [a.checkpoint_key for a in graph.nodes[i].attributes if a.name == "VARIABLE_VALUE"]
        return keys[0] if keys else None

    def shape(i):
        return tuple(shapes.get(variable(i), ()))

    if any(n in _LAYER_LISTS or _KERAS2_LAYER.match(n) for n, _, _ in children(0)):
        return "", _walk(0, children, variable, shape)  # the root is the model itself
    best: Tuple[str, Groups] = ("", {})
    for name, _, node in children(0):
        if variable(node) is not None or name in _NOT_WEIGHTS:
            continue
        groups = _walk(node, children, variable, shape)
        size = sum(len(g) for g in groups.values())
        if name == "model" and size:
            return name, groups
        if size > sum(len(g) for g in best[1].values()):
            best = (name, groups)
    return best


def _live_groups(model) -> Groups:
    """The engine model walked like a checkpoint; only its weights (no RNG state)."""
    view = tf.train.TrackableView(model)

    def children(obj):
        return [(name, id(child), child) for name, child in view.children(obj).items()]

    def variable(obj):
        return obj if isinstance(obj, (tf.Variable, keras.Variable)) else None

    groups = _walk(model, children, variable, lambda v: tuple(v.shape))
    weights = {id(v) for v in model.weights}
    kept = {path: {leaf: entry for leaf, entry in own.items() if id(entry[1]) in weights}
            for path, own in groups.items()}
    return {path: own for path, own in kept.items() if own}


def _pair_score(saved: dict, live: dict) -> float:
    """1 per common leaf of equal shape, a little for one of another shape, 0: no pair."""
    common = saved.keys() & live.keys()
    return sum(1.0 if saved[k][2] == live[k][2] else 0.01 for k in common)


def _align(saved: List[dict], live: List[dict]) -> List[Tuple[int, int]]:
    """Pairs layers of the two sequences in order, maximizing the total score.

    The same architecture pairs one to one; an inserted, removed or resized
    layer (a new head, a dropout, another nesting) shifts or skips only that
    part instead of moving every later weight into the wrong layer.
    """
    if [{k: e[2] for k, e in g.items()} for g in saved] == \
            [{k: e[2] for k, e in g.items()} for g in live]:
        return [(i, i) for i in range(len(saved))]
    n, m = len(saved), len(live)
    best = np.zeros((n + 1, m + 1))
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            score = _pair_score(saved[i], live[j])
            best[i, j] = max(best[i + 1, j], best[i, j + 1],
                             score + best[i + 1, j + 1] if score else 0.0)
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        score = _pair_score(saved[i], live[j])
        if score and best[i, j] == score + best[i + 1, j + 1]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif best[i, j] == best[i + 1, j]:
            i += 1
        else:
            j += 1
    return pairs


def _plan_object_graph(prefix, reader, graph, model, selected, excluded) -> _Plan:
    root, saved = _saved_groups(graph, reader.get_variable_to_shape_map())
    key_of = {id(v): k for k, v in selected.items()}
    live = _live_groups(model)
    saved_paths, live_paths = list(saved), list(live)
    where = f"model under '{root}'" if root else "model at the root"
    report = WarmStartReport(path=prefix, excluded=list(excluded),
                             source=f"Keras object-graph checkpoint, {where}")
    pairs, used = [], set()
    for i, j in _align([saved[p] for p in saved_paths], [live[p] for p in live_paths]):
        theirs, ours = saved[saved_paths[i]], live[live_paths[j]]
        for leaf, (_, var, shape) in ours.items():
            if leaf not in theirs:
                continue
            used.add((saved_paths[i], leaf))
            if id(var) not in key_of:
                continue  # excluded: its partner in the file is not "unused"
            if theirs[leaf][2] != shape:
                report.shape_mismatch.append(f"{key_of[id(var)]} {theirs[leaf][2]}->{shape}")
                continue
            report.matched.append(key_of[id(var)])
            pairs.append((var, _tensor(reader, theirs[leaf][1])))
    done = set(report.matched) | {m.split(" ")[0] for m in report.shape_mismatch}
    report.missing = [k for k in selected if k not in done]
    report.unused = ["/".join((root, *path, entry[0])).lstrip("/")
                     for path, own in saved.items() for leaf, entry in own.items()
                     if (path, leaf) not in used]
    return _Plan(report, apply=_assign(pairs))


def _tensor(reader, key) -> Callable[[], np.ndarray]:
    return lambda: np.asarray(reader.get_tensor(key))


# --------------------------------------------------- 3. Keras weights files
def _snapshot(variables) -> Callable[..., None]:
    """Remembers values now; the returned function puts back all but `keep` (ids)."""
    saved = [(v, np.array(v.numpy())) for v in variables]

    def restore(keep=frozenset()):
        for v, value in saved:
            if id(v) not in keep:
                v.assign(value)
    return restore


def _load_keras_file(path: str, model, variables: Dict[str, object], flag: str) -> set:
    """Loads path into model with skip_mismatch; returns the keys of variables it set.

    The float variables are set to NaN first, so "set" is exact even where a
    file value equals the current one (a fresh BN gamma of ones). The caller
    snapshots and restores: this leaves NaN in whatever the file did not set.
    """
    floats = {k: v for k, v in variables.items() if tf.as_dtype(v.dtype).is_floating}
    for v in floats.values():
        v.assign(np.full(v.shape, np.nan, tf.as_dtype(v.dtype).as_numpy_dtype))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one per skipped layer, and numpy noise
            model.load_weights(path, skip_mismatch=True)
    except Exception as e:  # noqa: BLE001 - Keras raises many types; the user needs one line
        raise StateError(f"{flag}={path} cannot be loaded into this model: "
                         f"{' '.join(str(e).split())[:300]}") from None
    return {k for k, v in floats.items() if not np.isnan(v.numpy()).any()}


def _plan_keras_file(path: str, model, selected, excluded) -> _Plan:
    """Keras' loader into the whole model, else into each nested model in turn.

    Keras matches a weights file by the structure of the model it loads
    into, so a file saved from the backbone alone (`model.get_layer(
    "backbone").save_weights`) fits only the nested backbone.
    """
    restore = _snapshot(model.variables)
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    for target in (model, *nested):
        try:
            loaded = _load_keras_file(path, target, selected, flag="--init_checkpoint")
        except StateError:
            if target is model:
                restore()
                raise
            loaded = set()  # that part of the model does not take this file at all
        if loaded:
            break
    restore(keep={id(selected[k]) for k in loaded})  # the rest, excluded ones too, as before
    into = "" if target is model or not loaded else f" loaded into the nested '{target.name}'"
    report = WarmStartReport(path=path, excluded=list(excluded), source=f"Keras weights file{into}")
    report.matched = [k for k in selected if k in loaded]
    report.missing = [k for k in selected if k not in loaded]
    if report.missing:
        report.source += "; missing means absent or of another shape, Keras does not say which"
    report.unused = _unused_file_tensors(path, [selected[k] for k in report.matched])
    return _Plan(report, undo=restore)


def _keras_file_tensors(path: str) -> Dict[str, np.ndarray]:
    """Every weight array in a .weights.h5 / .h5 / .keras file (optimizer ones left out)."""
    import h5py  # a Keras dependency; only these files need it

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if "model.weights.h5" not in z.namelist():
                return {}
            source = io.BytesIO(z.read("model.weights.h5"))
    else:
        source = path
    found = {}
    with h5py.File(source, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and not any(
                    part.startswith("optimizer") for part in name.split("/")):
                found[name] = np.asarray(obj)
        f.visititems(visit)
    return found


def _unused_file_tensors(path: str, matched_variables) -> List[str]:
    """Names of the file's arrays that no matched variable took.

    Keras does not say which array went where, but a loaded variable holds
    exactly its array's bytes, so arrays are paired with matched variables by
    shape and content; equal arrays are interchangeable for this count.
    """
    def digest(a):
        return a.shape, hashlib.sha1(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()

    pool = defaultdict(list)
    tensors = _keras_file_tensors(path)
    for name, array in tensors.items():
        pool[digest(array)].append(name)
    for v in matched_variables:
        names = pool.get(digest(np.asarray(v.numpy())))
        if names:
            names.pop(0)
    return sorted(n for names in pool.values() for n in names)


# --------------------------------------------- 4. name-based checkpoints
def _tokens(name: str) -> List[str]:
    """`block1_conv.Skernel:0/.ATTRIBUTES/VARIABLE_VALUE` -> [block1_conv, kernel]."""
    parts = []
    for part in _strip(name).split("/"):
        # tf.train.Checkpoint escapes "/" as ".S" and "." as ".." in attribute names.
        part = re.sub(r"\.(.)", lambda m: {"S": "/", ".": "."}.get(m.group(1), m.group(0)), part)
        parts.extend(part.split("/"))
    if parts:
        parts[-1] = _leaf(parts[-1])
    return parts


def _is_weight_name(name: str) -> bool:
    parts = _strip(name).split("/")
    return (name not in _NOT_WEIGHTS and parts[0] not in _NOT_WEIGHTS
            and ".OPTIMIZER_SLOT" not in name
            and not any(p in ("optimizer", "training") for p in parts))


def _suffix_pairs(file_tokens: Dict[str, List[str]],
                  live_tokens: Dict[str, List[str]]) -> List[Tuple[str, str]]:
    """Pairs names whose last k parts agree and are unique on both sides, k down to 2."""
    pairs, files, lives = [], dict(file_tokens), dict(live_tokens)
    longest = max([len(t) for t in (*files.values(), *lives.values())], default=0)
    for k in range(longest, 1, -1):
        by_file, by_live = defaultdict(list), defaultdict(list)
        for name, t in files.items():
            if len(t) >= k:
                by_file[tuple(t[-k:])].append(name)
        for key, t in lives.items():
            if len(t) >= k:
                by_live[tuple(t[-k:])].append(key)
        for suffix, names in by_file.items():
            keys = by_live.get(suffix, [])
            if len(names) == 1 and len(keys) == 1:
                pairs.append((names[0], keys[0]))
                del files[names[0]], lives[keys[0]]
    return pairs


def _plan_by_name(prefix, reader, shapes, selected, excluded) -> _Plan:
    file_tokens = {n: _tokens(n) for n in shapes if _is_weight_name(n)}
    live_tokens = {k: k.split("/") for k in (*selected, *excluded)}
    report = WarmStartReport(path=prefix, source="name-based checkpoint, matched by "
                             "layer/leaf name suffix", excluded=list(excluded))
    pairs, used = [], set()
    for name, key in _suffix_pairs(file_tokens, live_tokens):
        used.add(name)
        if key not in selected:
            continue
        var = selected[key]
        if tuple(shapes[name]) != tuple(var.shape):
            report.shape_mismatch.append(f"{key} {tuple(shapes[name])}->{tuple(var.shape)}")
            continue
        report.matched.append(key)
        pairs.append((var, _tensor(reader, name)))
    done = set(report.matched) | {m.split(" ")[0] for m in report.shape_mismatch}
    report.missing = [k for k in selected if k not in done]
    report.unused = sorted(_strip(n) for n in file_tokens if n not in used)
    return _Plan(report, apply=_assign(pairs))
