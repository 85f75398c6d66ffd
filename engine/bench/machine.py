"""The machine a benchmark ran on: software versions, CPU, threads, load.

cpu_flags: whether the CPU has the instructions a fast bfloat16 step needs
(AVX512_BF16 or AMX). Without them oneDNN emulates bfloat16 with float32
arithmetic plus conversions, so the bf16 comparison says what bfloat16
costs on this machine, not what it would gain on one that has them. From
/proc/cpuinfo's "flags" line, so Linux on x86 only; elsewhere the records
have no cpu_flags.
"""
from __future__ import annotations

import os
import platform
from typing import Dict, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf


# AVX-512 and its VNNI/BF16 extensions, and AMX tiles with their bfloat16 multiply.
BF16_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
CPUINFO = "/proc/cpuinfo"


def machine_info(cpuinfo: str = CPUINFO) -> Dict[str, object]:
    """Software versions, CPU and thread settings, for every record."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    flags = cpu_flags(cpuinfo)
    return {
        "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "cpu_model": cpu_model(), "cores": usable,
        "cpu_count": os.cpu_count(),
        # 0 means "TensorFlow picks" (about one thread per core for each).
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "TF_NUM_INTEROP_THREADS",
                                                   "TF_NUM_INTRAOP_THREADS") if k in os.environ},
        **({"cpu_flags": flags} if flags is not None else {}),
    }


def cpu_flags(cpuinfo: str = CPUINFO, names: Sequence[str] = BF16_FLAGS
              ) -> Optional[Dict[str, bool]]:
    """{flag: present} for names, from the first "flags" line of cpuinfo; None without one."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    present = set(value.split())
                    return {name: name in present for name in names}
    except OSError:
        pass
    return None


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
