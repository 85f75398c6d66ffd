"""Stopping cleanly on SIGTERM or Ctrl-C: finish the step, checkpoint, exit.

The handler only records the request; the trainer checks it between traced
calls (every --steps_per_loop steps), saves a checkpoint at that exact step
and raises Preempted, which train_main turns into a distinct exit code. A
second Ctrl-C interrupts at once, as a user pressing it twice expects.

train_main installs the handler first thing, so a request that comes while
TensorFlow loads, the data opens or the checkpoint is restored is honoured
too: the trainer checks it between those stages and stops there (nothing
is being written then, so there is nothing to save or clean).
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" (here: run the same command again)


class Preempted(Exception):
    """Raised after the checkpoint of a requested stop has been written."""


class StopSignals:
    """A context that turns SIGTERM/SIGINT into a request the loop polls."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous = {}
        self._depth = 0  # entered by train_main for the whole run, and again by the loop

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name

    def __enter__(self):
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            self.reinstall()
        return self

    def reinstall(self) -> None:
        """Puts the handler back on top, if entered.

        MultiWorkerMirroredStrategy's coordination service installs its own
        SIGTERM handler in C++ (TensorFlow's preemption notifier), which takes
        the signal from Python without stopping the run: a worker sent SIGTERM
        trained on to the end. The trainer calls this once the strategy exists.
        """
        if self._depth and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()
        return False


def stopped_before_training(requested: str, step: Optional[int]) -> Preempted:
    """The stop of a run asked to stop before its training loop ran (nothing to save).

    step: the step restored (0: a fresh start), None if not known yet.
    """
    if step is None:
        return Preempted(f"stopped by {requested} while starting, before training (nothing "
                         f"written, nothing to save): run the same command to start or resume")
    if step <= 0:
        return Preempted(f"stopped by {requested} before the run had started training (no "
                         f"checkpoint yet, nothing to save): run the same command to start it")
    return Preempted(f"stopped by {requested} before training went on from step {step} (its "
                     f"checkpoint is already saved): run the same command to resume")
