"""Shared pytest setup: keep TensorFlow's C++ start-up chatter out of test output."""
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def parse():
    """Parses flags as train_main would and returns the Config (flags reset afterwards)."""
    from absl import flags
    from engine import flags as engine_flags
    f = flags.FLAGS

    def _parse(*args):
        f.unparse_flags()
        f(["train_main.py", *args])
        return engine_flags.config_from_flags(f)
    yield _parse
    f.unparse_flags()


@pytest.fixture
def train_main_here(capfd):
    """Runs train_main's main() in this process on the given flags: (exit code, stdout, stderr).

    For errors met after TensorFlow loads, where a process of its own would
    spend most of its time importing TensorFlow: main() returns the code the
    CLI exits with and prints what it prints. Flag-parsing errors (absl's,
    before main) and the process's exit code are for a real process.
    """
    from absl import flags, logging
    import train_main
    f = flags.FLAGS
    verbosity = logging.get_verbosity()

    def _main(*args):
        f.unparse_flags()
        f(["train_main.py", *args])  # as the CLI parses them
        capfd.readouterr()
        code = train_main.main(["train_main.py"])
        out, err = capfd.readouterr()
        return code, out, err
    yield _main
    f.unparse_flags()
    logging.set_verbosity(verbosity)  # main() lowers it for the whole process


@pytest.fixture(scope="session")
def replica_runs(tmp_path_factory):
    """{N: the npz tests/replicas_worker.py wrote on N virtual CPUs} for N = 1, 2, 3.

    3 replicas need a process of their own (this session's CPU is split in 2 for
    good); 1 and 2 are recorded here, on this session's devices, meanwhile. Once
    for the whole run (under pytest-xdist too: see shared_dir).
    """
    import numpy as np
    import replicas_worker
    with shared_dir(tmp_path_factory, "replicas") as (root, made):
        if not made:
            env = dict(os.environ, PYTHONPATH=os.path.dirname(TESTS), TF_CPP_MIN_LOG_LEVEL="2")
            proc = subprocess.Popen([sys.executable, os.path.join(TESTS, "replicas_worker.py"),
                                     "3", str(root / "3.npz")], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                for n in (1, 2):
                    replicas_worker.record([f"/cpu:{i}" for i in range(n)], root / f"{n}.npz")
                log, _ = proc.communicate(timeout=300)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert proc.returncode == 0, f"replicas_worker.py 3:\n{log[-3000:]}"
        return {n: np.load(root / f"{n}.npz") for n in (1, 2, 3)}


# --- Made once for the whole run, read by every xdist worker -------------------
def _shared_root(tmp_path_factory):
    """The directory every worker of this run can see (the run's base temp dir)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def shared_dir(tmp_path_factory, name):
    """Yields (directory, made): one directory per name for the whole run.

    Under pytest-xdist each worker is a session of its own, so a session
    fixture runs once per worker; the first worker to get here makes what the
    directory should hold (made is False) while the others wait on a lock, then
    find it made (True). It counts as made only when the block ended without an
    error, so a failed attempt is made again (and fails again) by the next.
    """
    import fcntl
    root = _shared_root(tmp_path_factory)
    directory = root / name
    done = root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        made = done.exists()
        if not made:
            shutil.rmtree(directory, ignore_errors=True)  # what a failed attempt left
            directory.mkdir()
        yield directory, made
        done.touch()


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """One embedded dataset (both tasks) for the whole run, made once and read by every test.

    Under pytest-xdist the first worker builds the sets while the others wait
    (shared_dir; ~7 s of CPU on this machine, once instead of once per worker).
    """
    from engine.data import embedded, segmentation
    with shared_dir(tmp_path_factory, "tapeworks_cache") as (cache, made):
        if not made:
            embedded.ensure(str(cache))
            segmentation.ensure_embedded(str(cache))
    return str(cache)


# --- One finished CLI run, for tests that need *a* finished run ---------------------
# One frozen epoch of 2 steps (--unfreeze_at=1: a resume to a second epoch crosses
# the switch), EMA on (thresholds_ema.json, an EMA export).
TINY_RUN = ("--backbone=tiny_cnn", "--batch_size=16", "--steps_per_epoch=2", "--epochs=1",
            "--unfreeze_at=1", "--ema_decay=0.9", "--progress=false")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, embedded_cache):
    """`train_main.py --model_dir=DIR --cache_dir=... *TINY_RUN`, run to the end once for the
    whole run (shared_dir, keyed by its flags): {"model_dir", "stdout", "stderr"}.

    Nothing may write into it; copy_run gives a test a copy of its own.
    """
    args = [f"--cache_dir={embedded_cache}", *TINY_RUN]
    key = hashlib.sha256("\n".join(args).encode()).hexdigest()[:12]
    with shared_dir(tmp_path_factory, f"tiny_run-{key}") as (root, made):
        if not made:
            env = dict(os.environ, PYTHONPATH=os.path.dirname(TESTS), TF_CPP_MIN_LOG_LEVEL="3")
            result = subprocess.run(
                [sys.executable, os.path.join(os.path.dirname(TESTS), "train_main.py"),
                 f"--model_dir={root / 'run'}", *args],
                capture_output=True, text=True, timeout=240, env=env,
                cwd=os.path.dirname(TESTS))
            assert result.returncode == 0, result.stderr[-3000:]
            (root / "output.json").write_text(json.dumps(
                {"stdout": result.stdout, "stderr": result.stderr}))
    return {"model_dir": root / "run", **json.loads((root / "output.json").read_text())}


@pytest.fixture
def own_tiny_run(tiny_run, tmp_path):
    """This test's own copy of tiny_run's model_dir, at tmp_path/run (copy_run)."""
    return copy_run(tiny_run["model_dir"], tmp_path / "run")


def copy_run(model_dir, to):
    """A copy of a finished run at `to`, as if trained there: its flags.txt names `to` as
    --model_dir (the one line that names the directory a run was trained in)."""
    shutil.copytree(model_dir, to)
    flags_txt = to / "flags.txt"
    lines = flags_txt.read_text().splitlines(keepends=True)
    own = [i for i, line in enumerate(lines) if line.rstrip("\n") == f"--model_dir={model_dir}"]
    assert len(own) == 1, lines
    lines[own[0]] = f"--model_dir={to}\n"
    flags_txt.write_text("".join(lines))
    return to


# --- Virtual CPU devices, once for the whole session ------------------------
# TensorFlow fixes its devices the first time anything touches them, so the
# split happens in pytest_configure (below), before collection imports any test module.
# Any test can then build MirroredStrategy(["/cpu:0", "/cpu:1"]); the default
# strategy still places everything on one device (/cpu:0), and
# engine.distribute.split_cpu(2) is a no-op afterwards.
NUM_VIRTUAL_CPUS = 2


def _split_cpu_for_session(n=NUM_VIRTUAL_CPUS):
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    if tf.config.get_logical_device_configuration(cpu) is None:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
        except RuntimeError:  # devices already initialized by an earlier import
            pass


def _is_xdist_controller(config):
    """The pytest-xdist process that hands tests to its workers and runs none itself."""
    try:
        workers = config.getoption("numprocesses")
    except ValueError:  # xdist not installed or disabled (-p no:xdist)
        return False
    return bool(workers) and not hasattr(config, "workerinput")


# --- The longest tests first --------------------------------------------------
# pytest-xdist hands tests out in collection order; a multi-process test
# (kill -9 trials, CLI runs) collected last would leave one worker running it
# alone at the end. Tests marked `slow` (each several CLI processes) go first.
def pytest_configure(config):
    config.addinivalue_line("markers", "slow: several processes or long training; scheduled first")
    # Before collection imports any test module. The xdist controller runs no test:
    # it need not load TensorFlow at all (~3.5 s of CPU).
    if not _is_xdist_controller(config):
        _split_cpu_for_session()


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: order kept
