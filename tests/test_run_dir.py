"""engine/run_dir.py on its own: checkpoint discovery, state file repair, the lock, fresh starts."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import tensorflow as tf

from engine import run_dir
from engine.run_dir import RunDirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_checkpoints(directory, *steps):
    os.makedirs(directory, exist_ok=True)
    for step in steps:
        for suffix in (".index", ".data-00000-of-00001"):
            open(os.path.join(directory, f"ckpt-{step}{suffix}"), "w").close()


def _state_file(directory, *steps):
    with open(os.path.join(directory, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "ckpt-{steps[-1]}"\n')
        f.writelines(f'all_model_checkpoint_paths: "ckpt-{s}"\n' for s in steps)


def _steps(paths):
    return [int(p.rsplit("-", 1)[1]) for p in paths]


# ------------------------------------------------------------- discovery
@pytest.mark.parametrize("state", ["missing", "garbled", "empty"])
def test_checkpoints_are_found_without_a_usable_state_file(tmp_path, state):
    _fake_checkpoints(tmp_path, 2, 10, 4)
    if state == "garbled":
        (tmp_path / "checkpoint").write_bytes(b"\x00\xffgarbage {{{ not a proto")
    elif state == "empty":
        (tmp_path / "checkpoint").write_text("")
    paths = run_dir.list_checkpoints(str(tmp_path))
    assert _steps(paths) == [10, 4, 2]
    assert paths[0] == os.path.join(str(tmp_path), "ckpt-10")


def test_an_intact_state_file_keeps_its_order_and_files_it_does_not_list_follow(tmp_path):
    # After a rollback to ckpt-4 the run saved ckpt-6 again: the state file's save order
    # says ckpt-6 is newer than ckpt-8, whose weights led to the rollback.
    _fake_checkpoints(tmp_path, 4, 6, 8, 12, 1)
    _state_file(tmp_path, 4, 8, 6)
    # ckpt-12 and ckpt-1 are not listed (a save killed before the state file update, an old
    # leftover): found, but after what the state file committed, newest step first.
    assert _steps(run_dir.list_checkpoints(str(tmp_path))) == [6, 8, 4, 12, 1]


def test_a_garbled_state_file_is_not_trusted_for_order(tmp_path):
    _fake_checkpoints(tmp_path, 4, 6, 8)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-4"\n{{{ cut here')
    assert _steps(run_dir.list_checkpoints(str(tmp_path))) == [8, 6, 4]


def test_a_listed_checkpoint_whose_files_are_gone_stays_listed(tmp_path):
    _fake_checkpoints(tmp_path, 2)
    _state_file(tmp_path, 2, 4)
    assert _steps(run_dir.list_checkpoints(str(tmp_path))) == [4, 2]  # restore calls 4 unreadable


def test_no_directory_lists_nothing(tmp_path):
    assert run_dir.list_checkpoints(str(tmp_path / "nothing")) == []


def test_the_repaired_state_file_is_one_tensorflow_reads_and_rotates(tmp_path):
    _fake_checkpoints(tmp_path, 2, 4, 6)
    (tmp_path / "checkpoint").write_text("garbage")
    assert run_dir.repair_state_file(str(tmp_path))
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert _steps(state.all_model_checkpoint_paths) == [2, 4, 6]
    assert state.model_checkpoint_path.endswith("ckpt-6")
    # A manager made now knows them: its next save rotates the oldest away.
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), str(tmp_path),
                                         max_to_keep=3)
    manager.save(checkpoint_number=8)
    assert not os.path.exists(tmp_path / "ckpt-2.index")
    assert _steps(run_dir.list_checkpoints(str(tmp_path))) == [8, 6, 4]
    assert not run_dir.repair_state_file(str(tmp_path))  # intact now: left alone


def test_a_garbled_state_file_listing_nothing_is_kept_aside(tmp_path):
    (tmp_path / "checkpoint").write_bytes(b"\xff\xfe not utf-8")
    assert run_dir.repair_state_file(str(tmp_path))
    assert os.listdir(tmp_path) == ["checkpoint.unreadable"]
    assert not run_dir.repair_state_file(str(tmp_path))


def test_a_save_cut_short_while_merging_leaves_nothing_behind(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    _fake_checkpoints(checkpoints, 2, 4)
    (checkpoints / "ckpt-4_temp").mkdir()  # killed while merging ckpt-4: its index is garbage
    (checkpoints / "checkpoint.tmp1234").write_text("half a state file")
    (tmp_path / "flags.txt.tmp-99").write_text("half")
    run_dir.remove_leftovers(str(tmp_path), is_readable=lambda prefix: prefix.endswith("-2"))
    assert sorted(os.listdir(checkpoints)) == ["ckpt-2.data-00000-of-00001", "ckpt-2.index"]
    assert os.listdir(tmp_path) == ["checkpoints"]


# ------------------------------------------------------------------ lock
def test_one_training_run_holds_the_lock_and_is_named(tmp_path):
    with run_dir.lock_for_training(str(tmp_path / "run")):
        record = json.loads((tmp_path / "run" / ".lock").read_text())
        assert record["pid"] == os.getpid()
        with pytest.raises(RunDirError, match=rf"--model_dir=\S+ is in use by a training run "
                                              rf"\(pid {os.getpid()} on .*, started "
                                              rf"{re.escape(record['started'])}\)"):
            run_dir.lock_for_training(str(tmp_path / "run"))
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            run_dir.lock_for_reading(str(tmp_path / "run"))
    run_dir.lock_for_training(str(tmp_path / "run")).release()  # free again


def test_readers_share_the_lock_but_keep_a_training_run_out(tmp_path):
    run_dir.lock_for_training(str(tmp_path)).release()  # the lock file of an earlier run
    with run_dir.lock_for_reading(str(tmp_path)), run_dir.lock_for_reading(str(tmp_path)):
        with pytest.raises(RunDirError, match="in use by a running --mode=eval or --mode=export"):
            run_dir.lock_for_training(str(tmp_path))


def test_reading_writes_nothing(tmp_path):
    with run_dir.lock_for_reading(str(tmp_path / "never_trained")):
        pass
    assert not os.path.exists(tmp_path / "never_trained")


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from engine import run_dir; "
         "lock = run_dir.lock_for_training(sys.argv[1]); print('held', flush=True); "
         "time.sleep(120)", str(tmp_path)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
            run_dir.lock_for_training(str(tmp_path))
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    with run_dir.lock_for_training(str(tmp_path)):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch):
    def cannot(fd, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(run_dir.fcntl, "flock", cannot)
    for take in (run_dir.lock_for_training, run_dir.lock_for_reading):
        with take(str(tmp_path)) as lock:
            assert lock.warning.startswith(f"WARNING: --model_dir={tmp_path}: the file system "
                                           f"cannot lock (No locks available)")


@pytest.mark.parametrize("strategy,tf_config,chief", [
    ("default", None, True),
    ("multi_worker", json.dumps({"cluster": {"worker": ["a", "b"]},
                                 "task": {"type": "worker", "index": 0}}), True),
    ("multi_worker", json.dumps({"cluster": {"worker": ["a", "b"]},
                                 "task": {"type": "worker", "index": 1}}), False),
    ("multi_worker", json.dumps({"cluster": {"chief": ["c"], "worker": ["a"]},
                                 "task": {"type": "worker", "index": 0}}), False),
    ("multi_worker", json.dumps({"cluster": {"chief": ["c"], "worker": ["a"]},
                                 "task": {"type": "chief", "index": 0}}), True),
    ("multi_worker", "not json", True),  # make_strategy reports it
])
def test_only_the_chief_locks(strategy, tf_config, chief):
    assert run_dir.is_chief_task(strategy, tf_config) == chief


# ----------------------------------------------------------- fresh start
def _killed_before_its_first_checkpoint(model_dir):
    (model_dir / "rollback").mkdir(parents=True)
    (model_dir / "rollback" / "initial.index").write_text("x")
    (model_dir / "train").mkdir()
    (model_dir / "train" / "events.out.tfevents.1").write_text("x")
    (model_dir / "checkpoints").mkdir()
    (model_dir / "flags.txt").write_text("--epochs=2\n")
    (model_dir / "metrics.csv").write_text("epoch,loss\n")  # a header, no epoch yet
    run_dir.lock_for_training(str(model_dir)).release()


def test_what_a_run_killed_before_its_first_checkpoint_leaves_is_not_a_result(tmp_path):
    _killed_before_its_first_checkpoint(tmp_path)
    assert run_dir.earlier_results(str(tmp_path)) == []
    assert run_dir.prepare_fresh_start(str(tmp_path), overwrite=False) is None


def test_a_first_save_cut_short_is_not_a_result(tmp_path):
    _killed_before_its_first_checkpoint(tmp_path)
    for sub in ("checkpoints", "best"):
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / "ckpt-2_temp").mkdir()
        (tmp_path / sub / "ckpt-2.data-00000-of-00001").write_text("merged before the kill")
    (tmp_path / "checkpoints" / "checkpoint.tmp5f3a").write_text("half")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / ".2-x1y2").mkdir()  # export's scratch dir
    assert run_dir.earlier_results(str(tmp_path)) == []
    run_dir.remove_leftovers(str(tmp_path), is_readable=lambda prefix: False)
    assert os.listdir(tmp_path / "checkpoints") == [] and os.listdir(tmp_path / "best") == []


@pytest.mark.parametrize("result", ["checkpoints/ckpt-3.index", "best/ckpt-3.index",
                                    "export/3/saved_model.pb", "metrics.csv", "thresholds.json"])
def test_each_result_needs_overwrite_and_is_then_moved_aside(tmp_path, result):
    _killed_before_its_first_checkpoint(tmp_path)
    path = tmp_path / result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("epoch,loss\n1,0.5\n" if result == "metrics.csv" else "kept")
    before = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*")
              if p.is_file() and p.name != ".lock"}
    with pytest.raises(RunDirError, match=r"holds an earlier run's results \(.+\) but no "
                                          r"checkpoint to resume; pass --overwrite"):
        run_dir.prepare_fresh_start(str(tmp_path), overwrite=False)
    target = run_dir.prepare_fresh_start(str(tmp_path), overwrite=True)
    assert os.path.dirname(target) == str(tmp_path / "overwritten")
    assert sorted(os.listdir(tmp_path)) == [".lock", "overwritten"]
    after = {str(p.relative_to(target)): p.read_bytes() for p in
             pathlib.Path(target).rglob("*") if p.is_file()}
    assert after == before  # moved, nothing deleted
    # A later overwrite leaves the first move alone and never counts it as a result.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("epoch,loss\n1,0.4\n" if result == "metrics.csv" else "again")
    second = run_dir.prepare_fresh_start(str(tmp_path), overwrite=True)
    assert second != target and sorted(os.listdir(tmp_path / "overwritten")) == sorted(
        os.path.basename(p) for p in (target, second))


def test_write_atomically_leaves_the_old_file_when_it_fails(tmp_path, monkeypatch):
    path = tmp_path / "flags.txt"
    path.write_text("old\n")

    def no_space(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        run_dir.write_atomically(str(path), "new\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["flags.txt"]
