"""The machine a benchmark ran on: software versions, CPU, threads, load."""
from __future__ import annotations

import os
import platform
from typing import Dict, Optional

import keras
import numpy as np
import tensorflow as tf


def machine_info() -> Dict[str, object]:
    """Software versions, CPU and thread settings, for every record."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "cpu_model": cpu_model(), "cores": usable,
        "cpu_count": os.cpu_count(),
        # 0 means "TensorFlow picks" (about one thread per core for each).
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "TF_NUM_INTEROP_THREADS",
                                                   "TF_NUM_INTRAOP_THREADS") if k in os.environ},
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> Optional[float]:
    """The 1-minute load average, rounded (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
