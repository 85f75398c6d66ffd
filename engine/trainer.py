"""Trainer(config): build a run's parts, then drive them with the controller.

    Trainer(config).train()   ==   Controller(build_parts(config)).train()

The one-call entry point train_main.py and the tests use. What a run is
built from is engine/parts.py; the story it runs, top to bottom, is
engine/controller.py; the traced step is engine/steps.py.

A part is reached through `trainer.parts` (`trainer.parts.model`,
`trainer.parts.data`, `trainer.parts.config`), a loop counter through
`trainer.parts.counters` (`trainer.parts.counters.global_step`); the
controller's own objects are its attributes (`trainer.checkpointer`,
`trainer.phase`). There is no forwarding: `trainer.model` does not exist.
"""
from __future__ import annotations

from typing import Optional

from engine.config import Config
from engine.controller import Controller
from engine.parts import build_parts
from engine.preemption import StopSignals


class Trainer(Controller):
    def __init__(self, config: Config, strategy=None, stop_signals: Optional[StopSignals] = None):
        """strategy: a tf.distribute strategy to build under instead of the one
        --strategy names (the benchmark compares strategies side by side).
        stop_signals: the SIGTERM/SIGINT handler train_main installed at process
        start (None: the training loop installs its own)."""
        super().__init__(build_parts(config, strategy=strategy, stop_signals=stop_signals))
