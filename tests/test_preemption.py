"""SIGTERM mid-epoch: checkpoint at that step, distinct exit code, exact resume."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from engine.preemption import EXIT_PREEMPTED, StopSignals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(model_dir, cache):
    return [sys.executable, os.path.join(ROOT, "train_main.py"), f"--model_dir={model_dir}",
            f"--cache_dir={cache}", "--backbone=tiny_cnn", "--batch_size=16",
            "--steps_per_epoch=30", "--steps_per_loop=2", "--epochs=3", "--unfreeze_at=1",
            "--deterministic", "--progress=false"]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")


def _final_values(model_dir):
    path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith(("model/", "optimizer/"))}


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, embedded_cache):
    full = subprocess.run(_cmd(tmp_path / "full", embedded_cache), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr

    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen(_cmd(run_dir, embedded_cache), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 1:"):
                break
        time.sleep(0.5)  # into epoch 2
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "stopped by SIGTERM" in err and "run the same command to resume" in err
    assert "Traceback" not in err

    again = subprocess.run(_cmd(run_dir, embedded_cache), env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stdout
    expected, got = _final_values(tmp_path / "full"), _final_values(run_dir)
    assert set(expected) == set(got)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_stop_signals_nest_and_win_back_their_handler():
    """train_main enters them for the whole run and the loop again; a handler someone else
    installed in between (TensorFlow's, for a multi-worker strategy) is replaced again."""
    before = signal.getsignal(signal.SIGTERM)
    signals = StopSignals()
    with signals:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as the other handler would
        with signals:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert signals.requested == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is not before  # the outer entry still holds it
    assert signal.getsignal(signal.SIGTERM) is before
