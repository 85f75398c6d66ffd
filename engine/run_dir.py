"""Who may write a model_dir, and what in it belongs to which run.

A model_dir is the only copy of a run, so this module keeps it from being
lost in the ways users met:

- checkpoint discovery lists `ckpt-*.index` files as well as TensorFlow's
  `checkpoint` state file, so a deleted or garbled state file no longer hides
  the checkpoints (and a fresh start no longer overwrites them);
- one writer at a time: a training run holds an advisory `flock` on
  `model_dir/.lock` (released by the OS when the process dies, so kill -9
  leaves no stale lock); eval and export hold it shared, so they may run
  beside each other but not beside a training run;
- a fresh start over an earlier run's results needs `--overwrite`, and then
  moves them to `model_dir/overwritten/<UTC time>/` instead of deleting them.

Pure Python on purpose: train_main takes the lock before TensorFlow is
imported, so a refused run says so at once.
"""
from __future__ import annotations

import codecs
import contextlib
import datetime
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import socket
import time
from typing import Callable, List, Optional, Tuple

STATE_FILE = "checkpoint"  # TensorFlow's name for a checkpoint directory's state file
LOCK_FILE = ".lock"
OVERWRITTEN = "overwritten"
# Kept in place by a move aside: the lock this run holds, earlier moves, and
# the scratch copies of multi-worker runs (their workers may already be using them).
_NEVER_MOVED = (LOCK_FILE, OVERWRITTEN, ".workers")
_NEVER_MOVED_PREFIXES = (".rollback_worker_",)

# flock errors of file systems without locks (some NFS setups, FUSE mounts such as gcsfuse).
_CANNOT_LOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)
_STATE_ENTRY = re.compile(r'^(model_checkpoint_path|all_model_checkpoint_paths):\s*"(.*)"$')
_STATE_OTHER = re.compile(
    r"^(all_model_checkpoint_timestamps|last_preserved_timestamp):\s*[0-9.eE+-]+$")
_CHECKPOINT_INDEX = re.compile(r"^ckpt-(\d+)\.index$")
_STEP = re.compile(r"-(\d+)$")


class RunDirError(Exception):
    """A model_dir problem a user can act on (in use, results in the way); one line."""


# ----------------------------------------------------------- checkpoints
def list_checkpoints(directory: str) -> List[str]:
    """Checkpoint prefixes in directory, newest first: the state file's and those on disk.

    An intact state file is TensorFlow's commit record: what it lists comes
    first, in its order (the save order, which after a rollback is not the
    step order, and which a user may edit to pick a checkpoint). Checkpoint
    files it does not list follow, newest step first: leftovers, or a save
    killed before its state file update (TensorFlow's own rule: not
    committed). A missing or garbled state file lists nothing reliable, so
    then every checkpoint on disk goes by step. Listed checkpoints whose
    files are gone stay listed: restore reports them as unreadable instead
    of silently forgetting them.
    """
    listed, intact = _read_state_file(directory)
    listed = _unique([_join(directory, p) for p in reversed(listed)])
    on_disk = _on_disk(directory)
    if not intact:
        return sorted(_unique(listed + on_disk), key=_step, reverse=True)
    return listed + [p for p in on_disk if p not in listed]


def repair_state_file(directory: str) -> bool:
    """Rewrites the state file when it is missing, garbled, or misses checkpoints on disk.

    tf.train.CheckpointManager learns which checkpoints exist (and which to
    delete beyond --keep_checkpoints) only from the state file; without this,
    checkpoints it does not list would never be rotated away and
    `tf.train.latest_checkpoint` would not find them (and a state file that
    is not UTF-8 makes the manager fail). Returns True if it changed
    anything. The write is atomic (a temporary file renamed into place); a
    garbled file listing nothing is kept as `checkpoint.unreadable`.
    """
    paths = list_checkpoints(directory)
    listed, intact = _read_state_file(directory)
    state_file = os.path.join(directory, STATE_FILE)
    if not paths:
        if intact or not os.path.exists(state_file):
            return False
        os.replace(state_file, state_file + ".unreadable")
        return True
    if intact and {_join(directory, p) for p in listed} == set(paths):
        return False
    oldest_first = list(reversed(paths))
    stamps = [_mtime(p + ".index") for p in oldest_first]
    lines = [f'model_checkpoint_path: "{_quote(_relative(directory, paths[0]))}"']
    lines += [f'all_model_checkpoint_paths: "{_quote(_relative(directory, p))}"'
              for p in oldest_first]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in stamps]
    # Every checkpoint newer than this is one the manager may delete in turn.
    lines.append(f"last_preserved_timestamp: {min(stamps) - 1.0!r}")
    write_atomically(state_file, "\n".join(lines) + "\n")
    return True


def _read_state_file(directory: str) -> Tuple[List[str], bool]:
    """(checkpoint paths it lists, oldest first; True if every line parsed)."""
    try:
        with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return [], False
    latest, listed, intact = None, [], True
    for line in filter(None, (raw.strip() for raw in text.splitlines())):
        match = _STATE_ENTRY.match(line)
        if match is None:
            intact = intact and bool(_STATE_OTHER.match(line))
            continue
        path = codecs.escape_decode(match.group(2).encode())[0].decode("utf-8", "replace")
        if match.group(1) == "model_checkpoint_path":
            latest = path
        else:
            listed.append(path)
    if latest is not None and latest not in listed:
        listed.append(latest)
    return listed, intact and bool(listed)


def _on_disk(directory: str) -> List[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = [os.path.join(directory, n[:-len(".index")])
             for n in names if _CHECKPOINT_INDEX.match(n)]
    return sorted(found, key=_step, reverse=True)


def _join(directory: str, path: str) -> str:
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(directory, path))


def _relative(directory: str, path: str) -> str:
    return os.path.basename(path) if os.path.dirname(path) == os.path.normpath(directory) else path


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _unique(paths: List[str]) -> List[str]:
    return list(dict.fromkeys(paths))


def _step(path: str) -> int:
    match = _STEP.search(path)
    return int(match.group(1)) if match else -1


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return time.time()


# ------------------------------------------------------------------ lock
class RunDirLock:
    """An flock held on model_dir/.lock until release() (or the process ends).

    warning: set when the file system cannot lock (some network and FUSE
    file systems): the run goes on unguarded rather than not at all.
    """

    def __init__(self, fd: Optional[int], path: str, warning: Optional[str] = None):
        self._fd = fd
        self.path = path
        self.warning = warning

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def lock_for_training(model_dir: str, shown: Optional[str] = None) -> RunDirLock:
    """Takes model_dir's lock for writing, or raises RunDirError naming the holder.

    Called before anything is written into model_dir. The lock file then
    records this process (pid, host, start time) for the message a second
    run shows. `shown` is the path as the user typed it (for messages).
    """
    path = os.path.join(model_dir, LOCK_FILE)
    os.makedirs(model_dir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    unguarded = _flock(fd, fcntl.LOCK_EX, shown or model_dir, "or use another --model_dir")
    if unguarded is not None:
        return RunDirLock(None, path, unguarded)
    try:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": _utc_now().strftime("%Y-%m-%dT%H:%M:%SZ")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (record + "\n").encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return RunDirLock(fd, path)


def lock_for_reading(model_dir: str, shown: Optional[str] = None) -> RunDirLock:
    """A shared lock for eval and export: beside each other, never beside a training run.

    Writes nothing: the lock file is opened read-only (flock works on it), so
    a read-only model_dir can be evaluated. A model_dir without a lock file
    was never trained by a run that locks, so there is nothing to wait for.
    """
    path = os.path.join(model_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return RunDirLock(None, path)
    unguarded = _flock(fd, fcntl.LOCK_SH, shown or model_dir,
                       "(or evaluate a copy of its checkpoints/)")
    if unguarded is not None:
        return RunDirLock(None, path, unguarded)
    return RunDirLock(fd, path)


def _flock(fd: int, mode: int, shown: str, advice: str) -> Optional[str]:
    """Takes the lock without waiting: None when held, a warning when the file system
    cannot lock (the run goes on unguarded); RunDirError naming the holder when it is taken.
    fd is closed unless the lock is held."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirError(f"--model_dir={shown} is in use by {holder}; wait for it to end "
                          f"{advice}") from None
    except OSError as e:
        os.close(fd)
        if e.errno not in _CANNOT_LOCK:
            raise
        return _unguarded(shown, e)


def _unguarded(shown: str, e: OSError) -> str:
    return (f"WARNING: --model_dir={shown}: the file system cannot lock ({e.strerror}); nothing "
            f"stops a second run from writing into it at the same time")


def _holder(fd: int) -> str:
    """Who holds the lock on fd's file: a training run (as recorded) or readers only."""
    try:  # only shared holders (eval, export) if a shared lock can be had
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "a running --mode=eval or --mode=export"
    except BlockingIOError:
        pass
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return (f"a training run (pid {record['pid']} on {record['host']}, started "
                f"{record['started']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "a training run (it has not recorded its pid yet)"


def is_chief_task(strategy: str, tf_config: Optional[str]) -> bool:
    """Whether this process writes model_dir: always, except a non-chief multi-worker task.

    Mirrors engine.distribute.worker_info, from TF_CONFIG alone, so the lock
    can be taken before TensorFlow is imported and the strategy built.
    """
    if strategy != "multi_worker" or not tf_config:
        return True
    try:
        spec = json.loads(tf_config)
        cluster, task = spec.get("cluster", {}), spec.get("task", {})
        kind, index = task.get("type"), int(task.get("index", 0))
    except (ValueError, AttributeError, TypeError):
        return True  # make_strategy reports the bad TF_CONFIG
    return kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)


# ----------------------------------------------------------- fresh start
def earlier_results(model_dir: str) -> List[str]:
    """What an earlier run left that a fresh start would overwrite (names in model_dir).

    Results are checkpoints (any ckpt-* file), best/, export/, a metrics.csv
    with at least one epoch row and thresholds.json. What a run killed
    before its first checkpoint leaves (flags.txt, the lock, rollback/,
    event files, and a save cut short: ckpt-N_temp/ with whatever ckpt-N
    files it got to) is not: such a run simply starts again.
    """
    found = []
    checkpoints = _finished_entries(os.path.join(model_dir, "checkpoints"))
    if any(n.startswith("ckpt-") for n in checkpoints):
        found.append("checkpoints/ckpt-*")
    for sub in ("best", "export"):
        if _finished_entries(os.path.join(model_dir, sub)):
            found.append(sub + "/")
    if _has_an_epoch_row(os.path.join(model_dir, "metrics.csv")):
        found.append("metrics.csv")
    if os.path.exists(os.path.join(model_dir, "thresholds.json")):
        found.append("thresholds.json")
    return found


def _finished_entries(directory: str) -> List[str]:
    """Entries of a checkpoint or export dir that no cut-short write left.

    Not: ckpt-N_temp/ and the ckpt-N files of its save, the state file's
    temporary copies, export's hidden scratch dirs, nor the state file alone.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    cut_short = {n[:-len("_temp")] for n in names if n.endswith("_temp")}
    return [n for n in names if not (n.endswith("_temp") or n.startswith((".", STATE_FILE))
                                     or n.split(".", 1)[0] in cut_short)]


def _has_an_epoch_row(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.strip()) > 1  # a header and a row
    except FileNotFoundError:
        return False


def prepare_fresh_start(model_dir: str, *, overwrite: bool, move: bool = True,
                        shown: Optional[str] = None) -> Optional[str]:
    """Makes room for a fresh start; returns where earlier results went (None: nothing to move).

    Without `overwrite`, earlier results stop the run (RunDirError naming
    --overwrite): they would otherwise be overwritten in place by the new
    run's checkpoints and metrics. `move` is False on a non-chief worker
    (the chief moves).
    """
    found = earlier_results(model_dir)
    if not found:
        return None
    if not overwrite:
        raise RunDirError(
            f"--model_dir={shown or model_dir} holds an earlier run's results "
            f"({', '.join(found)}) but no checkpoint to resume; pass --overwrite to move them to "
            f"{os.path.join(shown or model_dir, OVERWRITTEN)}/ and start fresh, or use another "
            f"--model_dir")
    return move_aside(model_dir) if move else None


def move_aside(model_dir: str) -> str:
    """Moves everything in model_dir (but the lock and earlier moves) to overwritten/<UTC time>/.

    Renames only, never deletes: the earlier run stays whole for its owner.
    """
    target = _new_dir(os.path.join(model_dir, OVERWRITTEN),
                      _utc_now().strftime("%Y%m%dT%H%M%SZ"))
    for name in sorted(os.listdir(model_dir)):
        if name in _NEVER_MOVED or name.startswith(_NEVER_MOVED_PREFIXES):
            continue
        os.rename(os.path.join(model_dir, name), os.path.join(target, name))
    return target


def _new_dir(parent: str, name: str) -> str:
    os.makedirs(parent, exist_ok=True)
    for n in range(1000):
        path = os.path.join(parent, name if n == 0 else f"{name}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"{parent} has too many entries named {name}*")


# ---------------------------------------------------------------- writes
def write_atomically(path: str, text: str) -> None:
    """Writes text to path through a temporary file renamed into place.

    A failed write (a full disk) leaves the old file as it was and no
    temporary file behind.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def remove_leftovers(model_dir: str, is_readable: Optional[Callable[[str], bool]] = None) -> None:
    """Deletes what writes cut short (kill -9, a full disk) leave: never listed, never read.

    Checkpoint temp dirs (ckpt-N_temp/), the state file's temporary copies,
    and this package's temporary files (flags.txt, metrics.csv, thresholds).
    A save killed while merging its temp dir may also have left ckpt-N files
    under their final names; with `is_readable` those that cannot be read
    go too, so a run killed in its first save starts again instead of
    stopping at a checkpoint that never was.
    """
    for pattern in ("checkpoints/*_temp", "best/*_temp", "checkpoints/checkpoint.tmp*",
                    "best/checkpoint.tmp*", "*.tmp-*", "metrics.csv.tmp", ".thresholds-*.json"):
        for path in glob.glob(os.path.join(glob.escape(model_dir), pattern)):
            prefix = path[:-len("_temp")]
            if path.endswith("_temp") and is_readable is not None and not (
                    os.path.exists(prefix + ".index") and is_readable(prefix)):
                remove_checkpoint_files(prefix)  # what the merge got to: a data file, an index
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


def remove_checkpoint_files(prefix: str) -> None:
    """Deletes one checkpoint's files (a save that failed part way: they cannot be read)."""
    for path in [prefix + ".index"] + glob.glob(glob.escape(prefix) + ".data-*"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
