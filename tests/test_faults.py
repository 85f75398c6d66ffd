"""Faults a model_dir meets: a lost state file, two runs at once, kill -9 of the holder, a path
under a file, a read-only or full file system, SIGTERM while starting, results in the way.

(kill -9 at random moments during training is tests/test_robustness.py.)
"""
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from engine import run_dir
from engine.config import Config, DataConfig, FreezeConfig, ModelConfig, TrainConfig
from engine.data import embedded
from engine.preemption import EXIT_PREEMPTED
from engine.state import StateError, checkpoint_is_readable, existing_checkpoints
from engine.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = dict(epochs=1, batch_size=8, steps_per_epoch=4, steps_per_loop=2, checkpoint_every_steps=2,
           progress=False, summary_every=0)


def _config(model_dir, cache, **train):
    return Config(model=ModelConfig(backbone="tiny_cnn", input_size=32),
                  data=DataConfig(cache_dir=cache), freeze=FreezeConfig(unfreeze_at=0),
                  train=TrainConfig(model_dir=str(model_dir), **{**RUN, **train}))


def _cli(model_dir, cache, *extra):
    return [sys.executable, os.path.join(ROOT, "train_main.py"), f"--model_dir={model_dir}",
            f"--cache_dir={cache}", "--backbone=tiny_cnn", "--input_size=32", "--unfreeze_at=0",
            *(f"--{k}={str(v).lower()}" for k, v in RUN.items()), *extra]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")


def _run(model_dir, cache, *extra, timeout=240):
    return subprocess.run(_cli(model_dir, cache, *extra), env=_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _one_line_error(result, code=2):
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [l for l in result.stderr.splitlines() if l.strip()][-1]


def _train(config, lines=None):
    trainer = Trainer(config)
    if lines is not None:
        trainer.parts.log.listeners.append(lines.append)
    return trainer, trainer.train()


def _files(directory):
    """Every file under directory (dot files too) -> its bytes."""
    return {os.path.relpath(os.path.join(root, name), directory):
            open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, embedded_cache):
    """One epoch of 4 steps: checkpoints/ckpt-2 and ckpt-4, best/, metrics.csv, thresholds.json."""
    embedded.ensure(embedded_cache)
    model_dir = tmp_path_factory.mktemp("trained") / "run"
    _train(_config(model_dir, embedded_cache), [])
    assert [os.path.basename(p) for p in existing_checkpoints(str(model_dir / "checkpoints"))] \
        == ["ckpt-4", "ckpt-2"]
    return model_dir


def _copy(trained, to):
    shutil.copytree(trained, to)
    return to


# ---------------------------------------------------- the lost state file
def test_a_deleted_state_file_resumes_from_the_checkpoint_files(trained, tmp_path,
                                                                embedded_cache):
    model_dir = _copy(trained, tmp_path / "run")
    state_file = model_dir / "checkpoints" / "checkpoint"
    state_file.unlink()
    first_epoch = (model_dir / "metrics.csv").read_text().splitlines()[1]
    lines = []
    trainer, _ = _train(_config(model_dir, embedded_cache, epochs=2), lines)
    assert "\nresumed: " in lines[0] and "checkpoints/ckpt-4" in lines[0], lines[0]
    assert int(trainer.parts.counters.global_step.numpy()) == 8
    rows = (model_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1] == first_epoch  # epoch 1 kept, epoch 2 added
    # The state file was rebuilt, so --keep_checkpoints=3 rotates the old ones away again.
    steps = [os.path.basename(p) for p in existing_checkpoints(str(model_dir / "checkpoints"))]
    assert steps == ["ckpt-8", "ckpt-6", "ckpt-4"]
    assert "ckpt-4" in state_file.read_text()


def test_a_garbled_state_file_resumes_from_the_checkpoint_files(trained, tmp_path,
                                                                embedded_cache):
    model_dir = _copy(trained, tmp_path / "run")
    (model_dir / "checkpoints" / "checkpoint").write_bytes(b"model_checkpoint_path: {{\x00\xff")
    trainer = Trainer(_config(model_dir, embedded_cache, epochs=2))
    line = trainer.restore(starting=True)
    assert "\nresumed: " in line and "checkpoints/ckpt-4" in line, line  # after "--epochs: 1 -> 2"
    assert int(trainer.parts.counters.global_step.numpy()) == 4


def test_no_readable_checkpoint_stops_naming_them_and_touches_nothing(trained, tmp_path,
                                                                      embedded_cache):
    model_dir = _copy(trained, tmp_path / "run")
    (model_dir / "checkpoints" / "checkpoint").unlink()
    for step in (2, 4):
        with open(glob.glob(str(model_dir / "checkpoints" / f"ckpt-{step}.data-*"))[0], "r+b") as f:
            f.truncate(10)
    before = _files(model_dir)
    trainer = Trainer(_config(model_dir, embedded_cache, epochs=2))
    with pytest.raises(StateError, match=r"no readable checkpoint in \S+ \(2 unreadable: ckpt-4, "
                                         r"ckpt-2\); to start fresh, train with --overwrite"):
        trainer.train()
    after = _files(model_dir)
    after.pop("checkpoints/checkpoint")  # rebuilt from the files on disk: the only change
    assert after == before


# ------------------------------------------------------ one writer at a time
def test_a_second_run_on_a_model_dir_in_use_exits_2_naming_the_holder(tmp_path, embedded_cache):
    model_dir = tmp_path / "run"
    with run_dir.lock_for_training(str(model_dir)):  # this test process is the running run
        train = _run(model_dir, embedded_cache)
        evaluate = _run(model_dir, embedded_cache, "--mode=eval")
    for result in (train, evaluate):
        line = _one_line_error(result)
        assert line.startswith(f"error: --model_dir={model_dir} is in use by a training run "
                               f"(pid {os.getpid()} on "), line
    assert os.listdir(model_dir) == [".lock"]  # the refused run wrote nothing, not even flags.txt
    with run_dir.lock_for_reading(str(model_dir)):  # an eval is running
        line = _one_line_error(_run(model_dir, embedded_cache))
    assert "is in use by a running --mode=eval or --mode=export" in line, line


# ------------------------------------------------------- file-system errors
def test_a_model_dir_under_a_regular_file_is_one_line(tmp_path, embedded_cache):
    (tmp_path / "file").write_text("not a directory")
    bad = tmp_path / "file" / "run"
    line = _one_line_error(_run(bad, embedded_cache))
    assert line == (f"error: not a directory: {bad} (--model_dir={bad}); a part of the path is a "
                    f"file, not a directory"), line


def test_file_system_errors_name_the_flag_and_programming_errors_keep_their_traceback(tmp_path):
    import tensorflow as tf
    import train_main
    config = _config(tmp_path / "run", str(tmp_path / "cache"))
    line = train_main.file_system_error
    assert line(NotADirectoryError(20, "Not a directory", str(tmp_path / "cache" / "x")),
                config).endswith(f"(--cache_dir={tmp_path / 'cache'}); a part of the path is a "
                                 f"file, not a directory")
    assert line(PermissionError(13, "Permission denied", str(tmp_path / "run" / "flags.txt")),
                config).startswith(f"permission denied: {tmp_path / 'run' / 'flags.txt'} "
                                   f"(--model_dir=")
    full = tf.errors.ResourceExhaustedError(None, None, (
        "{{function_node __wrapped__SaveV2_dtypes_67_device_/job:localhost/replica:0/task:0/"
        f"device:CPU:0}}}} {tmp_path}/run/checkpoints/ckpt-6_temp/part-00000-of-00001.data-00000"
        "-of-00001.tempstate44369; No space left on device [Op:SaveV2]"))
    assert line(full, config) == (f"no space left on device: {tmp_path}/run/checkpoints/ckpt-6 "
                                  f"(--model_dir={tmp_path / 'run'}); free some space and run "
                                  f"the same command again (it resumes)")
    out_of_memory = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    assert line(out_of_memory, config) is None
    assert line(FileNotFoundError(2, "No such file", str(tmp_path / "run" / "x")), config) is None
    assert line(PermissionError(13, "Permission denied", "/elsewhere"), config) is None
    assert line(ValueError("a bug"), config) is None


def _mount(args, target):
    os.makedirs(target, exist_ok=True)
    result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"this machine refuses `mount {' '.join(args)}`: {result.stderr.strip()}")
    return target


@pytest.fixture
def mounts():
    made = []
    yield lambda args, target: made.append(_mount(args, target)) or target
    for target in reversed(made):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_read_only_model_dir_refuses_training_in_one_line_and_evaluates(
        trained, tmp_path, embedded_cache, mounts):
    # chmod 0555 does not stop root (these tests run as root): a read-only bind mount does.
    source = _copy(trained, tmp_path / "run")
    model_dir = mounts(["--bind", str(source)], tmp_path / "ro")
    subprocess.run(["mount", "-o", "remount,bind,ro", str(model_dir)], check=True)
    before = _files(source)
    line = _one_line_error(_run(model_dir, embedded_cache, "--epochs=2"))
    assert line.startswith(f"error: read-only file system: {model_dir}") \
        and f"(--model_dir={model_dir})" in line, line
    evaluated = _run(model_dir, embedded_cache, "--mode=eval")  # eval writes nothing
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "resumed: " in evaluated.stdout and "val_loss: " in evaluated.stdout
    assert _files(source) == before


def _leftovers(model_dir):
    """What a write cut short would leave: checkpoint temp dirs, temporary files."""
    return [p for pattern in ("*/*_temp", "*/checkpoint.tmp*", "*.tmp*", ".thresholds-*")
            for p in glob.glob(os.path.join(model_dir, pattern))]


def test_a_full_disk_is_one_line_and_the_run_resumes_once_space_is_freed(
        trained, tmp_path, embedded_cache, mounts):
    disk = mounts(["-t", "tmpfs", "-o", "size=2m", "tmpfs"], tmp_path / "disk")
    model_dir = _copy(trained, disk / "run")
    stat = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:  # leave less than one checkpoint (~200 KB) free
        f.write(b"\0" * (stat.f_bavail * stat.f_frsize - 100 * 1024))
    line = _one_line_error(_run(model_dir, embedded_cache, "--epochs=2"))
    assert line.startswith(f"error: no space left on device: {model_dir}") \
        and f"(--model_dir={model_dir}); free some space and run the same command" in line, line
    assert not _leftovers(model_dir)
    newest = existing_checkpoints(str(model_dir / "checkpoints"))[0]
    assert checkpoint_is_readable(newest), newest  # no half-written checkpoint listed first
    filler.unlink()
    lines = []
    trainer, _ = _train(_config(model_dir, embedded_cache, epochs=2), lines)
    assert lines[0].startswith("resumed: "), lines[0]
    assert int(trainer.parts.counters.global_step.numpy()) == 8


# ------------------------------------------------------- SIGTERM at startup
def _wait_for(predicate, proc, what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        time.sleep(0.01)
    raise AssertionError(f"no {what} in {timeout} s")


@pytest.mark.parametrize("when", ["lock taken", "fresh start line"])
def test_sigterm_while_starting_exits_75_with_nothing_half_written(tmp_path, embedded_cache,
                                                                   when):
    embedded.ensure(embedded_cache)
    model_dir, log_path = tmp_path / "run", tmp_path / "log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_cli(model_dir, embedded_cache), env=_env(), stdout=log,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        if when == "lock taken":  # the earliest moment the run shows: TensorFlow not loaded yet
            _wait_for(lambda: f'"pid": {proc.pid}' in _read(model_dir / ".lock"), proc,
                      "lock record")
        else:
            _wait_for(lambda: "fresh start" in _read(log_path), proc, "'fresh start' line")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    last = [l for l in err.splitlines() if l.strip()][-1]
    assert last.startswith("stopped by SIGTERM") and "before" in last and "training" in last \
        and "run the same command to start" in last, last
    assert "Traceback" not in err
    left = sorted(os.listdir(model_dir))
    assert left in ([".lock"], [".lock", "flags.txt", "manifest.json"]), left  # nothing partial


def _read(path):
    try:
        return open(path).read()
    except FileNotFoundError:
        return ""


# --------------------------------------------------- results in the way
def test_results_without_a_checkpoint_need_overwrite_and_are_then_moved_aside(
        trained, tmp_path, embedded_cache):
    model_dir = _copy(trained, tmp_path / "run")
    shutil.rmtree(model_dir / "checkpoints")  # best/, metrics.csv, thresholds.json remain
    (model_dir / "flags.txt").write_text("--epochs=1\n")
    before = _files(model_dir)
    line = _one_line_error(_run(model_dir, embedded_cache))
    assert line == (f"error: --model_dir={model_dir} holds an earlier run's results (best/, "
                    f"metrics.csv, thresholds.json) but no checkpoint to resume; pass "
                    f"--overwrite to move them to {model_dir}/overwritten/ and start fresh, or "
                    f"use another --model_dir"), line
    after = _files(model_dir)
    after.pop(".lock")
    assert after == before  # not even flags.txt was rewritten

    lines = []
    _train(_config(model_dir, embedded_cache, overwrite=True), lines)
    moved_to = glob.glob(str(model_dir / "overwritten" / "*"))
    assert len(moved_to) == 1 and lines[0] == \
        f"fresh start (the earlier run's files were moved to {moved_to[0]})", lines
    assert _files(moved_to[0]) == before  # all of it, byte for byte
    assert len((model_dir / "metrics.csv").read_text().splitlines()) == 2  # the new run's epoch
