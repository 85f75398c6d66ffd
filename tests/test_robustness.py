"""Crash safety: kill -9 at random moments (also during checkpoint writes) always resumes;
a corrupt or cut-short newest checkpoint is detected and the previous one used."""
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from engine.config import Config, DataConfig, FreezeConfig, ModelConfig, OptimizerConfig, \
    TrainConfig
from engine.data import embedded
from engine.state import StateError, existing_checkpoints
from engine.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = int(os.environ.get("TAPEWORKS_KILLS", "5"))  # kill -9 trials (seeded moments); more: set it


def _cmd(model_dir, cache):
    # A save after every step, so a good share of the run's time is spent writing checkpoints.
    return [sys.executable, os.path.join(ROOT, "train_main.py"), f"--model_dir={model_dir}",
            f"--cache_dir={cache}", "--backbone=tiny_cnn", "--batch_size=8",
            "--steps_per_epoch=30", "--epochs=2", "--unfreeze_at=1", "--steps_per_loop=1",
            "--checkpoint_every_steps=1", "--keep_checkpoints=2", "--ema_decay=0.9",
            "--summary_every=1", "--progress=false"]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")


def _wait_for_restore_line(log_path, proc, timeout=120):
    """The line Trainer.restore printed ('fresh start' / 'resumed: ...') once the run is about
    to train (its baseline line is out), or None if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path) as f:
            lines = f.readlines()
        restore = [l for l in lines if l.startswith(("fresh start", "resumed", "WARNING: checkpoint"))]
        if restore and any(l.startswith("baseline") for l in lines):
            return restore[0]
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    raise AssertionError("no restore line in time:\n" + open(log_path).read()[-2000:])


def _newest_step(model_dir):
    paths = existing_checkpoints(str(model_dir / "checkpoints"))
    return int(paths[0].rsplit("-", 1)[1]) if paths else -1


def _wait_for_progress(model_dir, proc, after, timeout=120):
    """Until a checkpoint newer than step `after` is listed (False if the run exited first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _newest_step(model_dir) > after:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint after step {after} in {timeout} s")


def _saving(model_dir):
    """A save in progress: TF writes ckpt-N_temp/ first, then merges it into ckpt-N.*."""
    return glob.glob(str(model_dir / "checkpoints" / "*_temp*"))


def _kill_during_a_save(model_dir, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _saving(model_dir):
            proc.send_signal(signal.SIGKILL)
            return
        time.sleep(0.001)


def _all_saved_tensors_finite_and_readable(model_dir):
    prefixes = [p[:-len(".index")] for p in glob.glob(os.path.join(model_dir, "*", "ckpt-*.index"))]
    assert prefixes
    for prefix in prefixes:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            value = reader.get_tensor(name)
            if name.startswith(("model/", "optimizer/", "ema/")) and value.dtype.kind == "f":
                assert np.all(np.isfinite(value)), (prefix, name)


@pytest.mark.slow
def test_kill_9_at_random_moments_always_resumes(tmp_path, embedded_cache):
    embedded.ensure(embedded_cache)  # made here, never half-made by a killed run
    model_dir = tmp_path / "run"
    rng = random.Random(20261123)
    restored, during_save = [], 0
    for i in range(KILLS):
        log_path = tmp_path / f"run{i}.log"
        had_checkpoint = bool(existing_checkpoints(str(model_dir / "checkpoints")))
        start_step = _newest_step(model_dir)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(_cmd(model_dir, embedded_cache), env=_env(), stdout=log,
                                    stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            line = _wait_for_restore_line(log_path, proc)
            if line is None:  # it ran to the end before the kill: that is a success too
                assert proc.wait() == 0, open(log_path).read()[-3000:]
                restored.append("finished")
                continue
            restored.append(line.strip())
            assert ("resumed" in line) == had_checkpoint, (had_checkpoint, line)
            # Whatever the load on the machine: one kill in three at a random moment once
            # the run has saved a new checkpoint (among steps, saves and evals), one the
            # moment a save is seen in progress, one at any moment after the restore
            # (baseline, tracing, the first steps).
            if i % 3 == 0:
                _wait_for_progress(model_dir, proc, start_step)
                time.sleep(rng.uniform(0.0, 1.5))
            elif i % 3 == 1:
                _wait_for_progress(model_dir, proc, start_step)
                time.sleep(rng.uniform(0.0, 0.5))
                _kill_during_a_save(model_dir, proc)
            else:
                time.sleep(rng.uniform(0.0, 3.0))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        during_save += bool(_saving(model_dir))  # the next run removes these leftovers
    final = subprocess.run(_cmd(model_dir, embedded_cache), env=_env(), capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "Traceback" not in final.stderr
    assert "resumed" in final.stdout
    assert during_save >= 1, during_save  # kills that cut a checkpoint write short
    assert not _saving(model_dir)  # their leftovers are gone
    assert sum("resumed" in r for r in restored) >= KILLS // 2, restored  # kills did land in training
    print(f"{KILLS} kills, {during_save} while a checkpoint was being written; restore lines: "
          f"{[r[:60] for r in restored]}")
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir / "checkpoints")))
    assert int(reader.get_tensor("train/epoch/.ATTRIBUTES/VARIABLE_VALUE")) == 2
    _all_saved_tensors_finite_and_readable(str(model_dir))


# ------------------------------------ kill -9 inside each phase of a gradual unfreeze
def _gradual_cmd(model_dir, cache):
    """Three phases (frozen, the top block, all) of 4 steps, a checkpoint after every step,
    per-block Adam groups with layer-wise LR decay, EMA, deterministic ops."""
    return [sys.executable, os.path.join(ROOT, "train_main.py"), f"--model_dir={model_dir}",
            f"--cache_dir={cache}", "--backbone=tiny_cnn", "--batch_size=8",
            "--steps_per_epoch=4", "--epochs=3", "--unfreeze_at=0",
            "--unfreeze_schedule=1:blocks:1,2:all", "--optimizer=adam", "--learning_rate=0.01",
            "--layer_lr_decay=0.5", "--ema_decay=0.9", "--steps_per_loop=1",
            "--checkpoint_every_steps=1", "--keep_checkpoints=20", "--deterministic",
            "--summary_every=0", "--progress=false"]


def _final_tensors(model_dir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir / "checkpoints")))
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    return {k[:-len(suffix)]: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.endswith(suffix) and not k.startswith("save_counter")}


@pytest.mark.slow
def test_gradual_unfreeze_killed_inside_each_phase_ends_bit_identical(tmp_path, embedded_cache):
    """kill -9 as soon as a checkpoint inside each phase is on disk (steps 1-4 frozen, 5-8 the top
    block, 9-12 all), each time resuming with the same command; the last run finishes. Its
    final state equals an uninterrupted run's, tensor for tensor (weights, every group's
    slots and step count, EMA shadows, counters)."""
    embedded.ensure(embedded_cache)
    reference = tmp_path / "reference"
    done = subprocess.run(_gradual_cmd(reference, embedded_cache), env=_env(),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    model_dir = tmp_path / "killed"
    resumed_at = []
    for inside in (1, 5, 9):  # the first step of each phase: three steps of margin
        log_path = tmp_path / f"until{inside}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(_gradual_cmd(model_dir, embedded_cache), env=_env(),
                                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            _wait_for_progress(model_dir, proc, inside - 1)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        resumed_at.append(_newest_step(model_dir))
        assert resumed_at[-1] < 12, open(log_path).read()[-2000:]  # killed before the end
    final = subprocess.run(_gradual_cmd(model_dir, embedded_cache), env=_env(),
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    assert "resumed" in final.stdout
    # Each kill left a checkpoint in the phase it was aimed at (or the next step's).
    assert [1 + (step - 1) // 4 for step in resumed_at] == [1, 2, 3], resumed_at
    got, expected = _final_tensors(model_dir), _final_tensors(reference)
    assert set(got) == set(expected)
    assert int(got["train/global_step"]) == 12
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


# ----------------------------------------------- corrupt newest checkpoints
def _config(model_dir, cache):
    return Config(model=ModelConfig(backbone="tiny_cnn", input_size=32),
                  data=DataConfig(cache_dir=cache),
                  optimizer=OptimizerConfig(name="momentum", learning_rate=0.05),
                  freeze=FreezeConfig(unfreeze_at=0),
                  train=TrainConfig(model_dir=str(model_dir), epochs=1, batch_size=16,
                                    steps_per_epoch=4, steps_per_loop=2,
                                    checkpoint_every_steps=2, progress=False, summary_every=0))


def _files(prefix):
    return {"index": prefix + ".index", "data": glob.glob(prefix + ".data-*")[0]}


def _flip_a_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


CORRUPTIONS = {
    "data byte flipped": lambda p: _flip_a_byte(_files(p)["data"]),
    "data cut short": lambda p: open(_files(p)["data"], "r+b").truncate(10),
    "data file missing": lambda p: os.remove(_files(p)["data"]),
    "index cut short": lambda p: open(_files(p)["index"], "r+b").truncate(20),
    "index empty": lambda p: open(_files(p)["index"], "w").close(),
    "index missing": lambda p: os.remove(_files(p)["index"]),
}


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, embedded_cache):
    source = tmp_path / "source"
    trained = Trainer(_config(source, embedded_cache))
    trained.train()  # checkpoints at steps 2 and 4
    for name, corrupt in CORRUPTIONS.items():
        run = tmp_path / name.replace(" ", "_")
        shutil.copytree(source, run)
        corrupt(str(run / "checkpoints" / "ckpt-4"))
        trainer = Trainer(_config(run, embedded_cache))
        line = trainer.restore()
        assert line.startswith("WARNING: checkpoint") and "ckpt-4 is unreadable" in line, name
        assert "resumed: restored" in line and "ckpt-2" in line, name
        assert int(trainer.parts.counters.global_step.numpy()) == 2, name
    # Every checkpoint unreadable: a clear error, not a fresh start over the user's run.
    run = tmp_path / "all_bad"
    shutil.copytree(source, run)
    for step in (2, 4):
        CORRUPTIONS["data cut short"](str(run / "checkpoints" / f"ckpt-{step}"))
    with pytest.raises(StateError, match="no readable checkpoint.*2 unreadable"):
        Trainer(_config(run, embedded_cache)).restore()


# ------------------------------------------------ bad data through the trainer
def _data_with_a_broken_image(directory):
    from engine.data.tfrecord import write_tfrecords
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(21)]
    broken = tf.io.encode_png(images[0]).numpy()[:60]  # cut short after the header
    write_tfrecords(str(directory / "train"), images[:16] + [broken], [[i % 3] for i in range(17)])
    write_tfrecords(str(directory / "val"), images[16:] + [b"\x89PNG broken"], [[0]] * 6)
    (directory / "labels.txt").write_text("a\nb\nc\n")
    return str(directory)


def test_an_undecodable_image_stops_the_cli_with_one_line_naming_it(tmp_path, train_main_here):
    data_dir = _data_with_a_broken_image(tmp_path)
    code, _, err = train_main_here(f"--model_dir={tmp_path}/run", f"--data_dir={data_dir}",
                                   "--backbone=tiny_cnn", "--batch_size=4", "--epochs=1",
                                   "--progress=false")
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    last = [l for l in err.splitlines() if l.strip()][-1]
    # BN calibration reads the training split first: its broken record is the one met
    assert last.startswith("error: ") and "train-00000-of-00001.tfrecord record 16: image does " \
        "not decode" in last and "--skip_bad_records" in last, last


def test_skipped_records_are_counted_in_the_epoch_report(tmp_path, embedded_cache):
    data_dir = _data_with_a_broken_image(tmp_path)
    config = _config(tmp_path / "run", embedded_cache).replace(
        data={"data_dir": data_dir, "skip_bad_records": True},
        train={"batch_size": 4, "checkpoint_every_steps": 0})
    trainer = Trainer(config)
    lines = []
    trainer.parts.log.listeners.append(lines.append)
    result = trainer.train()
    assert result["skipped_records"] == 2 and trainer.parts.data.num_train == 16
    warning = next(l for l in lines if "--skip_bad_records left out 2 records" in l)
    assert "train-00000-of-00001.tfrecord record 16: image does not decode" in warning
    assert "val-00000-of-00001.tfrecord record 5: image does not decode" in warning


# ------------------------------------------- preemption of one worker of two
def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both_at_the_same_step(tmp_path, embedded_cache):
    """Without agreement the preempted worker would leave and the other hang in its next
    all-reduce; with it both save the same step and exit with EXIT_PREEMPTED."""
    import json
    from engine.preemption import EXIT_PREEMPTED
    embedded.ensure(embedded_cache)
    model_dir = tmp_path / "run"
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    procs, logs = [], []
    for index in range(2):
        env = dict(_env(), TF_CONFIG=json.dumps({"cluster": cluster,
                                                 "task": {"type": "worker", "index": index}}))
        logs.append(tmp_path / f"worker{index}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "train_main.py"), f"--model_dir={model_dir}",
                 f"--cache_dir={embedded_cache}", "--backbone=tiny_cnn", "--batch_size=16",
                 "--steps_per_epoch=100", "--epochs=1", "--steps_per_loop=2",
                 "--checkpoint_every_steps=4", "--strategy=multi_worker", "--summary_every=0",
                 "--progress=false"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    try:
        _wait_for_progress(model_dir, procs[0], -1)
        procs[1].send_signal(signal.SIGTERM)  # the non-chief only
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [open(path).read() for path in logs]
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], "\n".join(o[-1500:] for o in outputs)
    steps = [int(o.split("stopped by ", 1)[1].split(" at step ", 1)[1].split()[0]) for o in outputs]
    assert "stopped by SIGTERM at step" in outputs[1]
    assert "stopped by a stop request on another worker at step" in outputs[0]
    assert steps[0] == steps[1] == _newest_step(model_dir) < 100
