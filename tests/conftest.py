"""Shared pytest setup: keep TensorFlow's C++ start-up chatter out of test output."""
import os
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


@pytest.fixture(scope="session")
def replica_runs(tmp_path_factory):
    """{N: the npz tests/replicas_worker.py wrote on N virtual CPUs} for N = 1, 2, 3.

    Processes of their own (this session's CPU is split in 2 for good), run at once.
    """
    root = tmp_path_factory.mktemp("replicas")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(TESTS), TF_CPP_MIN_LOG_LEVEL="2")
    procs = {n: subprocess.Popen([sys.executable, os.path.join(TESTS, "replicas_worker.py"),
                                  str(n), str(root / f"{n}.npz")], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (1, 2, 3)}
    import numpy as np
    out = {}
    for n, proc in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"replicas_worker.py {n}:\n{log[-3000:]}"
        out[n] = np.load(root / f"{n}.npz")
    return out


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """One embedded dataset (both tasks) for the whole run, made once and read by every test.

    Under pytest-xdist each worker is a session of its own; they share the
    run's base temp dir, and a lock makes the first worker build the sets
    while the others wait (~17 s of CPU each on this machine, once instead
    of once per worker).
    """
    import fcntl
    from engine.data import embedded, segmentation
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = shared / "tapeworks_cache"
    cache.mkdir(exist_ok=True)
    with open(shared / "tapeworks_cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        embedded.ensure(str(cache))
        segmentation.ensure_embedded(str(cache))
    return str(cache)


# --- Virtual CPU devices, once for the whole session ------------------------
# TensorFlow fixes its devices the first time anything touches them, so the
# split happens here, at collection time, before any test module runs TF.
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


_split_cpu_for_session()


# --- The longest tests first --------------------------------------------------
# pytest-xdist hands tests out in collection order; a multi-process test
# (kill -9 trials, CLI runs) collected last would leave one worker running it
# alone at the end. Tests marked `slow` (each several CLI processes) go first.
def pytest_configure(config):
    config.addinivalue_line("markers", "slow: several processes or long training; scheduled first")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: order kept
