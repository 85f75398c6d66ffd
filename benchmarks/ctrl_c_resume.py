"""The README run stopped with Ctrl-C during epoch 6, run again, compared with a run never stopped.

    python benchmarks/ctrl_c_resume.py --work_dir=/tmp/e2e [train_main flags...]

Runs `train_main.py --backbone=inceptionv3 --unfreeze_at=5 --deterministic` three
times: once uninterrupted; once sent SIGINT (what Ctrl-C sends) a few seconds
into epoch 6, the first unfrozen epoch; and once more with the same
--model_dir, which resumes. Then compares every tensor of the two final
checkpoints and prints how many differ (0 means bit-identical) and the wall
time of each run. Extra arguments go to every run (e.g. --epochs=7 for a
shorter check).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(model_dir, extra):
    return [sys.executable, os.path.join(REPO, "train_main.py"), "--backbone=inceptionv3",
            "--unfreeze_at=5", "--deterministic", "--progress=false",
            f"--model_dir={model_dir}", *extra]


def _final(model_dir):
    import tensorflow as tf
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if not k.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


def compare(full_dir, stopped_dir):
    """Keys whose final values differ (NaN equals NaN: unset callback bests are NaN).

    save_counter is left out: it counts the saves of each process's
    tf.train.Checkpoint object (the stopped run's resumed process made fewer),
    not training state.
    """
    a, b = _final(full_dir), _final(stopped_dir)
    keys = [k for k in a if not k.startswith("save_counter")]
    differ = [k for k in keys if k not in b or a[k].shape != b[k].shape
              or not np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f")]
    return differ, len(keys)


def main(argv):
    work = next((a.split("=", 1)[1] for a in argv if a.startswith("--work_dir=")), "/tmp/ctrl_c_resume")
    extra = [a for a in argv if not a.startswith("--work_dir=")]
    full_dir, stopped_dir = os.path.join(work, "full"), os.path.join(work, "stopped")
    times = {}

    tic = time.time()
    subprocess.run(_cmd(full_dir, extra), check=True)
    times["uninterrupted"] = time.time() - tic

    tic = time.time()
    proc = subprocess.Popen(_cmd(stopped_dir, extra), stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.startswith("epoch 5:"):
            break
    time.sleep(20)  # the unfrozen step is traced, then some steps of epoch 6 run
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate()
    sys.stdout.write(rest)
    times["stopped"] = time.time() - tic
    print(f"interrupted run exit code: {proc.returncode}")

    tic = time.time()
    subprocess.run(_cmd(stopped_dir, extra), check=True)
    times["resumed"] = time.time() - tic

    differ, compared = compare(full_dir, stopped_dir)
    print(f"tensors compared: {compared}; differ: {len(differ)} {differ[:5]}")
    print("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return 1 if differ or proc.returncode != 75 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
