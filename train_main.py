"""tapeworks: python train_main.py --backbone=inceptionv3 --unfreeze_at=5

Flags -> Config -> one mode. The training story is engine/trainer.py; the
traced step it runs is engine/steps.py; who may write a model_dir is
engine/run_dir.py.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from engine import flags as engine_flags  # noqa: E402  (defines the flags)
from engine import run_dir  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.preemption import EXIT_PREEMPTED, Preempted, StopSignals, \
    stopped_before_training  # noqa: E402

FLAGS = flags.FLAGS
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell shows for a run stopped by Ctrl-C
# File-system errors a user can act on; TensorFlow's own errors carry the same texts.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_FILE_SYSTEM = _NO_SPACE + (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)
_ADVICE = {errno.ENOSPC: "free some space and run the same command again (it resumes)",
           errno.EDQUOT: "free some space and run the same command again (it resumes)",
           errno.EROFS: "pick a place on a writable file system",
           errno.EACCES: "pick a place you may write to, or fix its permissions",
           errno.EPERM: "pick a place you may write to, or fix its permissions",
           errno.ENOTDIR: "a part of the path is a file, not a directory"}


def _user_errors():
    """Exception types whose message is for the user, one line, no traceback."""
    from engine.data import DataError
    from engine.health import TrainingDiverged  # ran out of rollbacks: a diagnosis, one line
    from engine.losses import LossError
    from engine.metrics import NonFiniteOutputs  # --mode=eval of diverged weights
    from engine.state import StateError
    from models import ModelError
    return (ConfigError, DataError, TrainingDiverged, LossError, StateError, ModelError,
            NonFiniteOutputs, run_dir.RunDirError)


def main(argv):
    logging.set_verbosity(logging.WARNING)  # TF's checkpoint INFO lines drown the epoch lines
    # First of all, before TensorFlow loads: from here on a SIGTERM/SIGINT to a training
    # run is a request honoured at the next safe point (exit 75), never a death mid-write.
    signals = StopSignals() if FLAGS.mode == "train" else None
    with signals if signals is not None else contextlib.nullcontext():
        return _main(argv, signals)


def _main(argv, signals: Optional[StopSignals]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return EXIT_USER_ERROR
    if FLAGS.deterministic:
        # oneDNN's CPU kernels are not covered by TF's op determinism: two
        # InceptionV3 runs differed in 758 of 760 tensors with them on, none
        # with them off. The switch is read when TensorFlow is imported, which
        # has not happened yet here (flags and config import no TensorFlow).
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
    config = None
    try:
        config = engine_flags.config_from_flags()
        from engine.config import MODES
        if FLAGS.mode not in MODES:
            raise ConfigError(f"--mode={FLAGS.mode} is not one of {', '.join(MODES)}")
        with _claim_model_dir(config, FLAGS.mode):  # before anything is written into it
            _run_mode(config, FLAGS.mode, signals)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # a second Ctrl-C: at once, whatever was under way
        print("interrupted by a second Ctrl-C; run the same command to resume from the newest "
              "checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001
        line = user_error_line(e, config)
        if line is None:
            raise  # a bug: keep the traceback
        print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def user_error_line(e: Exception, config=None) -> Optional[str]:
    """The one line for an error a user can act on (principle 6), None for anything else.

    What the CLI prints after "error: " before exiting 2; None means a bug,
    which keeps its traceback. config: the run's Config, when one was made
    (it names the flag of a path in a file-system error).
    """
    if isinstance(e, (run_dir.RunDirError, ConfigError)):  # first: no TensorFlow import
        return str(e)
    line = file_system_error(e, config)
    if line is not None:
        return line
    if isinstance(e, _user_errors()):
        return str(e)
    # tf.data assertions name the file and record of a bad input; show that line only.
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(e, tf.errors.InvalidArgumentError) \
            and "assertion failed" in str(e):
        return "bad input data: " + str(e).split("assertion failed:", 1)[1].strip().splitlines()[0]
    return None


def _claim_model_dir(config, mode: str):
    """The model_dir lock this mode needs (engine/run_dir.py).

    Training writes: an exclusive lock, taken by a multi-worker run's chief
    only (the other workers write scratch copies the chief owns). Eval and
    export read: a shared lock. Benchmark only appends its own record file.
    """
    model_dir = os.path.abspath(os.path.expanduser(config.train.model_dir))
    shown = config.train.model_dir
    if mode == "train" and run_dir.is_chief_task(config.train.strategy,
                                                 os.environ.get("TF_CONFIG")):
        lock = run_dir.lock_for_training(model_dir, shown=shown)
        _warn(lock.warning)
        try:
            if not config.train.overwrite and not run_dir.list_checkpoints(
                    os.path.join(model_dir, "checkpoints")):
                # Refused now rather than after the data and model are built; a checkpoint
                # that exists but cannot be read is found by Trainer.restore.
                run_dir.prepare_fresh_start(model_dir, overwrite=False, shown=shown)
        except BaseException:
            lock.release()
            raise
        return lock
    if mode in ("eval", "export", "predict"):
        lock = run_dir.lock_for_reading(model_dir, shown=shown)
        _warn(lock.warning)
        return lock
    return contextlib.nullcontext()


def _warn(line: Optional[str]) -> None:
    if line:
        print(line, file=sys.stderr)


def _run_mode(config, mode: str, signals: Optional[StopSignals]) -> None:
    _stop_if_requested(signals)
    from engine.trainer import Trainer  # loads TensorFlow: seconds
    if mode == "train":
        _stop_if_requested(signals)
        Trainer(config, stop_signals=signals).train(flags_text=engine_flags.effective_flags())
    elif mode == "eval":
        trainer = Trainer(config)
        line = trainer.restore()
        if trainer.resumed_from is None:  # restore() started fresh: nothing to evaluate
            from engine.state import StateError
            raise StateError(f"--model_dir={config.train.model_dir} has no checkpoint to "
                             f"evaluate; train first (or check the path)")
        print(line)
        for key, value in trainer.evaluate(save=False).items():  # eval writes nothing
            print(f"{key}: {value:.4f}")
    elif mode == "benchmark":
        from engine.bench.run import run_benchmark
        run_benchmark(config)
    elif mode == "predict":
        from engine.predict import predict
        print(predict(config))
    else:
        from engine.export import export_saved_model
        print(export_saved_model(config))


def _stop_if_requested(signals: Optional[StopSignals]) -> None:
    """Startup stages before the Trainer exists: a stop asked for so far ends the run here."""
    if signals is not None and signals.requested:
        raise stopped_before_training(signals.requested, None)


def file_system_error(e: Exception, config) -> Optional[str]:
    """One line for a file-system error a user can act on, naming the path and its flag.

    Not a directory, permission denied, read-only, no space left: from Python
    (OSError) or from TensorFlow's file writes (its errors carry the same
    strerror texts). None for anything else, so programming errors keep
    their traceback; errors outside the directories the flags name count
    only when they are a full disk.
    """
    if isinstance(e, OSError):
        code, paths = e.errno, [str(e.filename)] if e.filename else []
    else:
        tf = sys.modules.get("tensorflow")
        if tf is None or not isinstance(e, tf.errors.OpError):
            return None
        code = next((c for c in _FILE_SYSTEM if os.strerror(c) in e.message), None)
        # Absolute paths standing alone (not the /job:... of a device name); a checkpoint's
        # temporary file is named by its checkpoint (ckpt-N_temp/part-... -> ckpt-N).
        paths = [re.sub(r"_temp/.*$", "", m.group(0).rstrip(";:,"))
                 for m in re.finditer(r"(?<!\S)/\S+", e.message)]
    if code not in _FILE_SYSTEM or not paths:
        return None
    path = next((p for p in paths if _flag_for(p, config)), paths[0])
    flag = _flag_for(path, config)
    if flag is None and code not in _NO_SPACE:
        return None
    where = f" ({flag})" if flag else ""
    return f"{os.strerror(code).lower()}: {path}{where}; {_ADVICE[code]}"


def _flag_for(path: str, config) -> Optional[str]:
    """`--flag=value` of the directory flag path lies under (the innermost), else None."""
    if config is None:
        return None
    found = None
    for flag, value in (("--model_dir", config.train.model_dir),
                        ("--cache_dir", config.data.cache_dir),
                        ("--data_dir", config.data.data_dir)):
        if not value:
            continue
        root = os.path.abspath(os.path.expanduser(value))
        inside = os.path.abspath(path) == root or os.path.abspath(path).startswith(root + os.sep)
        if inside and (found is None or len(root) > len(found[1])):
            found = (f"{flag}={value}", root)
    return found[0] if found else None


def _parse_flags(argv):
    """absl's parsing, with its errors as one line and exit 2 like every user error.

    absl's own prints "FATAL Flags parsing error" and exits 1 (a missing
    --flagfile, --epochs=abc).
    """
    asked = {a.split("=", 1)[0] for a in argv[1:]}
    if asked & {"--help", "-help", "-h", "-?", "--helpshort", "--helpfull"}:
        sys.stdout.write(engine_flags.help_text(full="--helpfull" in asked))
        sys.exit(0)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        message = str(e).strip()
        while message.startswith("ERROR:"):  # absl's own prefix on flagfile errors
            message = message[len("ERROR:"):].lstrip(": ")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
