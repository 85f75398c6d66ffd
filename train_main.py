"""tapeworks: python train_main.py --backbone=inceptionv3 --unfreeze_at=5

Flags -> Config -> one mode. The training story is engine/trainer.py; the
traced step it runs is engine/steps.py.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from engine import flags as engine_flags  # noqa: E402  (defines the flags)
from engine.preemption import EXIT_PREEMPTED, Preempted  # noqa: E402

FLAGS = flags.FLAGS
EXIT_USER_ERROR = 2


def _user_errors():
    """Exception types whose message is for the user, one line, no traceback."""
    from engine.config import ConfigError
    from engine.data import DataError
    from engine.health import TrainingDiverged  # ran out of rollbacks: a diagnosis, one line
    from engine.losses import LossError
    from engine.metrics import NonFiniteOutputs  # --mode=eval of diverged weights
    from engine.state import StateError
    from models import ModelError
    return (ConfigError, DataError, TrainingDiverged, LossError, StateError, ModelError,
            NonFiniteOutputs)


def _write_effective_flags(model_dir: str) -> None:
    """flags.txt, written atomically once the run is known to be valid (Trainer.train's `started`)."""
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, "flags.txt")
    with open(path + ".tmp", "w") as f:
        f.write(engine_flags.effective_flags())
    os.replace(path + ".tmp", path)


def main(argv):
    logging.set_verbosity(logging.WARNING)  # TF's checkpoint INFO lines drown the epoch lines
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return EXIT_USER_ERROR
    if FLAGS.deterministic:
        # oneDNN's CPU kernels are not covered by TF's op determinism: two
        # InceptionV3 runs differed in 758 of 760 tensors with them on, none
        # with them off. The switch is read when TensorFlow is imported, which
        # has not happened yet here (flags and config import no TensorFlow).
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
    try:
        config = engine_flags.config_from_flags()
        from engine.config import MODES
        if FLAGS.mode not in MODES:
            from engine.config import ConfigError
            raise ConfigError(f"--mode={FLAGS.mode} is not one of {', '.join(MODES)}")
        from engine.trainer import Trainer
        if FLAGS.mode == "train":
            model_dir = os.path.expanduser(config.train.model_dir)
            Trainer(config).train(started=lambda: _write_effective_flags(model_dir))
        elif FLAGS.mode == "eval":
            trainer = Trainer(config)
            print(trainer.restore())
            for key, value in trainer.evaluate().items():
                print(f"{key}: {value:.4f}")
        elif FLAGS.mode == "benchmark":
            from engine.benchmark import run_benchmark
            run_benchmark(config)
        elif FLAGS.mode == "predict":
            from engine.predict import predict
            print(predict(config))
        else:
            from engine.export import export_saved_model
            print(export_saved_model(config))
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return EXIT_PREEMPTED
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # noqa: BLE001
        # tf.data assertions name the file and record of a bad input; show that line only.
        import tensorflow as tf
        if isinstance(e, tf.errors.InvalidArgumentError) and "assertion failed" in str(e):
            line = str(e).split("assertion failed:", 1)[1].strip().splitlines()[0]
            print(f"error: bad input data: {line}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise
    return 0


def _parse_flags(argv):
    """absl's parsing, with its errors as one line and exit 2 like every user error.

    absl's own prints "FATAL Flags parsing error" and exits 1 (a missing
    --flagfile, --epochs=abc).
    """
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
