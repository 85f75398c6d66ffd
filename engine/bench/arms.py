"""Timed arms: ways of running train steps, measured in alternated windows.

    LoopArm(name, input, run_steps, dataset, K)   any (iterator, num_steps) -> (loss, _) callable
    EngineArm(name, input, trainer, dataset, K)   a Trainer's run_steps in its current phase
    FitArm(trainer, dataset, steps_per_execution) Keras model.fit on the trainer's model
    alternate(arms, windows, window_s)            round r measures every arm once
    summarize(rates), ratios(num_arm, den_arm)    median, min, max (and per round)

How it is timed, so that numbers from a noisy shared machine mean something:
  * Building the models and tracing the step are not timed; the first call of
    each arm is reported apart as time_to_first_step_s (for the first arm of
    each trainer it includes the trace; for a fit arm, fit's compile).
  * Each arm then warms up for half a window, untimed.
  * A window is repeated calls of K steps for at least window_s seconds of
    wall time, then ONE host sync (a float of the last loss); its rate is
    steps / (time after that sync - time before the first call).
  * Before each window, a full garbage collection (untimed, for every arm).
  * Windows of all arms are ALTERNATED (round r runs every arm once, the
    order rotated by r), so a slow minute on the machine hits every arm, and
    every ratio is taken per round, between windows measured side by side,
    then summarized by median and min-max.
  * Fit windows are timed by a callback from the first batch's begin to the
    begin of the batch after the window ends (where it reads the optimizer's
    step counter, a sync, and stops fit). So fit's per-call set-up (dataset
    distribution, iterator) is excluded as the engine's is, and fit keeps its
    own per-step behaviour (the callback adds no batch-end hook, so it does
    not change how Keras dispatches batch-end work; on the TF backend Keras
    converts the logs to Python numbers after every execution in any case,
    i.e. one host sync per steps_per_execution steps).
  * A background tf.data pipeline (the real arm's prefetch) may still fill
    its buffer for a moment after its own window: a small cost that lands
    at the start of the next arm's window.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from engine.optimizer import make_keras_optimizer, make_schedule
from engine.steps import holds_xla_function

SYNTHETIC, REAL = "synthetic", "real"


class Arm:
    """One way of running train steps; collects (steps, seconds) per window."""

    kind = "engine"

    def __init__(self, name: str, input_kind: str, steps_per_loop: int):
        self.name = name
        self.input = input_kind
        self.steps_per_loop = steps_per_loop
        self.time_to_first_step_s: Optional[float] = None
        self.samples: List[Tuple[int, float]] = []
        self.cores_busy: List[float] = []

    def rates(self) -> List[float]:
        return [steps / seconds for steps, seconds in self.samples]

    def warm_up(self, window_s: float) -> None:
        """The first call (timed apart), then half a window, untimed."""
        self.start()
        tic = time.perf_counter()
        self.first_call()
        self.time_to_first_step_s = time.perf_counter() - tic
        self.window(window_s / 2)  # fills the pipeline, settles caches

    def start(self) -> None:
        """Untimed set-up before the first call."""

    def first_call(self) -> None:
        raise NotImplementedError

    def window(self, window_s: float) -> Tuple[int, float]:
        raise NotImplementedError

    def measure(self, window_s: float) -> None:
        # Collect leftover garbage outside the window, for every arm alike: a
        # full collection takes ~0.15 s here (300k live objects, mostly TF and
        # Keras), and whichever window it happened to land in would carry it.
        gc.collect()
        cpu, wall = time.process_time(), time.perf_counter()
        self.samples.append(self.window(window_s))
        # Process CPU seconds per wall second (all threads): below the core
        # count when the machine is shared or the step does not fill it.
        self.cores_busy.append((time.process_time() - cpu) / (time.perf_counter() - wall))


class LoopArm(Arm):
    """Calls run_steps(iterator, K) over one iterator of dataset; one host sync per window."""

    def __init__(self, name: str, input_kind: str, run_steps: Callable, dataset,
                 steps_per_loop: int):
        super().__init__(name, input_kind, steps_per_loop)
        self.run_steps = run_steps
        self.dataset = dataset
        self.iterator = None

    def start(self):
        self.iterator = iter(self.dataset)

    def first_call(self):
        loss, _ = self.run_steps(self.iterator, 1)
        float(loss)

    def window(self, window_s):
        run_steps, iterator, k = self.run_steps, self.iterator, self.steps_per_loop
        calls = 0
        start = time.perf_counter()
        while True:
            loss, _ = run_steps(iterator, k)
            calls += 1
            if time.perf_counter() - start >= window_s:
                break
        float(loss)  # the one host sync of the window
        return calls * k, time.perf_counter() - start


class EngineArm(LoopArm):
    """The trainer's traced train loop (run_steps), K steps per call, in its current phase.

    It iterates trainer.feed(dataset), as training does: each replica reads
    its own slice, prefetched to its device (the dataset itself on the
    default strategy).
    """

    def __init__(self, name: str, input_kind: str, trainer, dataset, steps_per_loop: int):
        super().__init__(name, input_kind, trainer.run_steps, trainer.feed(dataset),
                         steps_per_loop)
        self.trainer = trainer  # whose model (and phase, EMA, strategy) the arm trains

    def xla_compiled(self) -> bool:
        """Whether the traced loop runs its step under XLA (after warm_up)."""
        k = tf.constant(self.steps_per_loop, tf.int32)
        return holds_xla_function(self.trainer.train_loop.get_concrete_function(self.iterator, k))


class _FitWindow(keras.callbacks.Callback):
    """Times fit from the first batch's begin to the first batch begun after window_s.

    Only `on_train_batch_begin` is overridden: Keras decides whether batch-end
    callbacks run asynchronously from the batch-END hooks, so fit keeps its
    default behaviour. Steps are counted by the optimizer's iterations.
    """

    def __init__(self, window_s: float, optimizer):
        super().__init__()
        self.window_s = window_s
        self.optimizer = optimizer
        self.start = self.end = None
        self.start_iterations = self.steps = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.start is None:
            self.start_iterations = int(self.optimizer.iterations.numpy())
            self.start = time.perf_counter()
            return
        if self.end is None and time.perf_counter() - self.start >= self.window_s:
            self.steps = int(self.optimizer.iterations.numpy()) - self.start_iterations  # a sync
            self.end = time.perf_counter()
            self.model.stop_training = True


class _KerasLoss(keras.losses.Loss):
    """The trainer's per-example loss (labels, logits) -> [B] as a Keras loss (mean over batch)."""

    def __init__(self, fn):
        super().__init__(name="tapeworks_loss", reduction="sum_over_batch_size")
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


class FitArm(Arm):
    """Keras model.fit on the trainer's model (same layers and variables), own compile state.

    With Keras' own optimizer class (what a fit user has), not the engine's
    fused-kernel subclass (engine/optimizer.py).
    """

    kind = "keras_fit"
    _MANY_STEPS = 10 ** 8  # steps_per_epoch of a window; the callback stops it

    def __init__(self, trainer, dataset, steps_per_execution: int, jit_compile: bool = False):
        super().__init__(f"keras_fit/spe={steps_per_execution}", SYNTHETIC, steps_per_execution)
        c = trainer.parts.config
        self.trainer = trainer
        self.dataset = dataset
        self.steps_per_execution = steps_per_execution
        with trainer.parts.strategy.scope():
            # A second functional Model over the same layers: same weights and
            # trainable flags, but its own compile state, so the two fit arms
            # (different steps_per_execution) never recompile each other.
            self.model = keras.Model(trainer.parts.model.inputs, trainer.parts.model.outputs,
                                     name=f"keras_fit_spe{steps_per_execution}")
            schedule = make_schedule(c.optimizer, trainer.parts.steps_per_epoch, c.train.epochs)
            self.optimizer = make_keras_optimizer(c.optimizer, schedule,
                                                  name=f"fit_spe{steps_per_execution}",
                                                  fused=False)
            self.model.compile(optimizer=self.optimizer, loss=_KerasLoss(trainer.parts.loss_fn),
                               steps_per_execution=steps_per_execution,
                               jit_compile=bool(jit_compile))

    def first_call(self):
        self.model.fit(self.dataset, steps_per_epoch=self.steps_per_execution, epochs=1, verbose=0,
                       shuffle=False)
        float(self.optimizer.iterations.numpy())

    def window(self, window_s):
        timer = _FitWindow(window_s, self.optimizer)
        many = self._MANY_STEPS // self.steps_per_execution * self.steps_per_execution
        self.model.fit(self.dataset, steps_per_epoch=many, epochs=1, verbose=0,
                       shuffle=False, callbacks=[timer])
        if timer.end is None:
            raise RuntimeError(f"{self.name}: fit ended before the {window_s} s window did")
        return timer.steps, timer.end - timer.start


def alternate(arms: Sequence[Arm], windows: int, window_s: float, after_round=None) -> None:
    """Times `windows` rounds; round r measures every arm once, the order rotated by r."""
    for r in range(windows):
        shift = r % len(arms)
        for arm in list(arms[shift:]) + list(arms[:shift]):
            arm.measure(window_s)
        if after_round is not None:
            after_round()


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """median, min, max and spread ((max - min) / median) of values."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else float("nan")}


def ratios(num: Arm, den: Arm) -> Dict[str, object]:
    """num/den per round (windows measured side by side), summarized."""
    per_round = [a / b for a, b in zip(num.rates(), den.rates())]
    s = summarize(per_round)
    return {"median": s["median"], "min": s["min"], "max": s["max"], "per_window": per_round}
