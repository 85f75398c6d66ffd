"""The steps/sec harness: times the traced train step and nothing else.

    run_benchmark(config) -> one record per arm (also printed as a table and
                             appended to model_dir/benchmark.jsonl)

An arm is one way of running train steps. The main arms run the engine's
train loop on a synthetic input (one in-memory batch repeated) or on the real
input (the trainer's own training pipeline, repeated so it never runs dry).
--benchmark_compare adds arms, each timed side by side with the main
synthetic arm ("engine/synthetic", the reference) in the same process:

  keras_fit  Keras `model.fit` on the same model and synthetic data
             (steps_per_execution 1 and K = steps_per_loop): engine / fit;
             with Keras' own optimizer class (what a fit user has), not
             the engine's fused-kernel subclass (engine/optimizer.py)
  ema        a second Trainer, identical but with EMA on (decay 0.999) if
             the run has it off, else off: EMA on / off
  frozen     a second Trainer entered in the other phase: frozen / unfrozen
  mirrored1  a second Trainer under a MirroredStrategy with ONE replica
             (the default strategy's device): mirrored x1 / default
  k1         the same trainer and traced loop called with 1 step per call
             (K is a tensor: no retrace): K=1 / K

Each Trainer builds its own model (and optimizer, EMA) from the same config
and seed, so the arms differ only in the one thing compared.

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

FLOPs (flops_per_step): TensorFlow's profiler (tf.compat.v1.profiler,
float_operation) over a traced graph of ONE train step's computation on
the global batch: the forward pass in training mode, the loss, and
tape.gradient with respect to the variables that train in the arm's phase,
as replica_forward in engine/steps.py does. So a frozen backbone is counted as
forward of the whole model + backward of the head only (the tape does not
record the frozen backbone), and frozen BatchNorm in inference mode. The
profiler has no FLOP statistics for depthwise-convolution gradients
(MobileNetV2); those are added here at the forward op's cost (2 x output
elements x kernel area). Not counted: the optimizer and EMA updates (a few
element-wise FLOPs per parameter, < 1% here), and ops without FLOP
statistics (BatchNorm, casts). The profiler counts the whole graph as
written, e.g. the first convolution's input gradient that the runtime
prunes (tiny). achieved_flops_per_sec = flops_per_step x median steps/s;
fraction_of_peak divides it by the best 2048 x 2048 matmul (2 n^3 FLOPs,
in the policy's compute dtype; best of 3 after one untimed) timed in this
process before the windows and after every round. On a busy machine the
peak reads low and the fraction high (even > 1): compare fractions from a
quiet machine only.

Precision: --mixed_precision=bfloat16|float16 sets Keras' mixed policy
(engine/precision.py) for the whole run, so the fit arm's model gets it too
(the head keeps float32 logits, weights stay float32), and restores the
previous policy at the end; float16 arms train with the engine's dynamic
loss scale, the fit arm with the LossScaleOptimizer Keras' compile adds.
--jit_compile XLA-compiles each replica's forward/backward pass
(engine/steps.py) and the fit arm's train function; the run checks the
traced loop for XLA before it times anything.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from engine import distribute, freeze, precision
from engine.config import Config, ConfigError
from engine.optimizer import _make_keras_optimizer, make_schedule
from engine.steps import holds_xla_function

SYNTHETIC, REAL = "synthetic", "real"
REFERENCE = "engine/synthetic"  # every comparison is timed against this arm
EMA_DECAY = 0.999  # --benchmark_compare=ema turns EMA on with this decay
MATMUL_N, MATMUL_REPEATS = 2048, 3

# Targets from the tracker, checked on the records: ratio prefix ->
# [(lowest acceptable median, the backbones it applies to (None: all),
#   the fit arm it applies to: "spe=1", "spe=K" (the engine's K) or None: any)].
TARGETS = {
    "ema_over_off": [(0.97, None, None)],  # EMA costs at most 3%
    "frozen_over_unfrozen": [(3.0, ("inceptionv3",), None)],
    "mirrored1_over_default": [(0.95, None, None)],
    "real_over_synthetic": [(0.95, None, None)],
    "engine_over_fit": [(1.15, ("inceptionv3",), "spe=1"), (1.0, ("inceptionv3",), "spe=K"),
                        (1.25, ("tiny_cnn",), "spe=K")],  # tiny_cnn: with K >= 20
}
# Achieved FLOP/s over the matmul peak, unfrozen engine/synthetic arm.
PEAK_FRACTION_TARGET = (0.60, ("inceptionv3",))


# ----------------------------------------------------------------- arms
class _Arm:
    """One way of running train steps; collects (steps, seconds) per window."""

    kind = "engine"

    def __init__(self, name: str, input_kind: str, steps_per_loop: int, trainer):
        self.name = name
        self.input = input_kind
        self.steps_per_loop = steps_per_loop
        self.trainer = trainer  # whose model (and phase, EMA, strategy) the arm trains
        self.time_to_first_step_s: Optional[float] = None
        self.samples: List[Tuple[int, float]] = []
        self.cores_busy: List[float] = []

    def rates(self) -> List[float]:
        return [steps / seconds for steps, seconds in self.samples]

    def warm_up(self, window_s: float) -> None:
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


class _EngineArm(_Arm):
    """The trainer's traced train loop over one iterator, K steps per call."""

    def __init__(self, name, input_kind, trainer, dataset, steps_per_loop):
        super().__init__(name, input_kind, steps_per_loop, trainer)
        self.dataset = dataset
        self.iterator = None
        self.k = tf.constant(steps_per_loop, tf.int32)

    def warm_up(self, window_s):
        self.iterator = iter(self.dataset)
        tic = time.perf_counter()
        loss, _ = self.trainer.train_loop(self.iterator, tf.constant(1, tf.int32))
        float(loss)
        self.time_to_first_step_s = time.perf_counter() - tic
        self.window(window_s / 2)  # untimed: fills the pipeline, settles caches

    def window(self, window_s):
        loop, iterator, k = self.trainer.train_loop, self.iterator, self.k
        calls = 0
        start = time.perf_counter()
        while True:
            loss, _ = loop(iterator, k)
            calls += 1
            if time.perf_counter() - start >= window_s:
                break
        float(loss)  # the one host sync of the window
        return calls * self.steps_per_loop, time.perf_counter() - start

    def xla_compiled(self) -> bool:
        """Whether the traced loop runs its step under XLA."""
        return holds_xla_function(self.trainer.train_loop.get_concrete_function(self.iterator,
                                                                                self.k))


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


class _FitArm(_Arm):
    """Keras model.fit on the trainer's model (same layers and variables), own compile state."""

    kind = "keras_fit"
    _MANY_STEPS = 10 ** 8  # steps_per_epoch of a window; the callback stops it

    def __init__(self, trainer, dataset, steps_per_execution, jit_compile=False):
        super().__init__(f"keras_fit/spe={steps_per_execution}", SYNTHETIC, steps_per_execution,
                         trainer)
        c = trainer.config
        self.dataset = dataset
        self.steps_per_execution = steps_per_execution
        with trainer.strategy.scope():
            # A second functional Model over the same layers: same weights and
            # trainable flags, but its own compile state, so the two fit arms
            # (different steps_per_execution) never recompile each other.
            self.model = keras.Model(trainer.model.inputs, trainer.model.outputs,
                                     name=f"keras_fit_spe{steps_per_execution}")
            schedule = make_schedule(c.optimizer, trainer.steps_per_epoch, c.train.epochs)
            self.optimizer = _make_keras_optimizer(c.optimizer, schedule,
                                                   name=f"fit_spe{steps_per_execution}",
                                                   fused=False)
            self.model.compile(optimizer=self.optimizer, loss=_KerasLoss(trainer.loss_fn),
                               steps_per_execution=steps_per_execution,
                               jit_compile=bool(jit_compile))

    def warm_up(self, window_s):
        tic = time.perf_counter()
        self.model.fit(self.dataset, steps_per_epoch=self.steps_per_execution, epochs=1, verbose=0,
                       shuffle=False)
        float(self.optimizer.iterations.numpy())
        self.time_to_first_step_s = time.perf_counter() - tic
        self.window(window_s / 2)

    def window(self, window_s):
        timer = _FitWindow(window_s, self.optimizer)
        many = self._MANY_STEPS // self.steps_per_execution * self.steps_per_execution
        self.model.fit(self.dataset, steps_per_epoch=many, epochs=1, verbose=0,
                       shuffle=False, callbacks=[timer])
        if timer.end is None:
            raise RuntimeError(f"{self.name}: fit ended before the {window_s} s window did")
        return timer.steps, timer.end - timer.start


def alternate(arms: Sequence[_Arm], windows: int, window_s: float, after_round=None) -> None:
    """Times `windows` rounds; round r measures every arm once, the order rotated by r."""
    for r in range(windows):
        shift = r % len(arms)
        for arm in list(arms[shift:]) + list(arms[:shift]):
            arm.measure(window_s)
        if after_round is not None:
            after_round()


@contextlib.contextmanager
def _trainer_strategy(strategy):
    """Trainers built inside use `strategy` instead of one made from the config.

    Trainer makes its strategy with distribute.make_strategy(name,
    num_virtual_cpus) and has no way yet to take a device list, so a
    one-replica MirroredStrategy on a CPU split into several devices (the test
    session) cannot be asked for through the config. Single-threaded use only.
    """
    make = distribute.make_strategy
    distribute.make_strategy = lambda *args, **kwargs: strategy
    try:
        yield
    finally:
        distribute.make_strategy = make


# ---------------------------------------------------------------- FLOPs
_DEPTHWISE_GRADS = ("DepthwiseConv2dNativeBackpropInput", "DepthwiseConv2dNativeBackpropFilter")


def graph_flops(fn, *specs) -> int:
    """FLOPs of fn's traced graph: TF's profiler, plus the depthwise-conv gradients it omits."""
    graph = tf.function(fn).get_concrete_function(*specs).graph
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # the profiler uses deprecated TF1 helpers and says so
    try:
        total = tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops
    finally:
        logger.setLevel(level)
    for op in graph.get_operations():
        if op.type not in _DEPTHWISE_GRADS:
            continue
        # As the forward DepthwiseConv2dNative: 2 x output elements x kernel area.
        kernel = op.inputs[1].shape if op.type.endswith("Input") else op.outputs[0].shape
        out_backprop = op.inputs[2].shape
        total += 2 * out_backprop.num_elements() * kernel[0] * kernel[1]
    return int(total)


def train_step_flops(model, loss_fn, images, labels) -> Dict[str, int]:
    """FLOPs of one train step on a batch like (images, labels), in the model's current phase.

    {"step": forward + loss + gradients of what trains now, "forward": forward only}.
    Mirrors replica_forward in engine/steps.py (the tape watches only the
    trainable variables) without the optimizer update; see the module text.
    """
    variables = [v if isinstance(v, tf.Variable) else v.value for v in model.trainable_variables]
    batch = int(images.shape[0])

    def forward(x):
        return model(x, training=True)

    def step(x, y):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            logits = model(x, training=True)
            loss = tf.reduce_sum(loss_fn(y, logits)) / batch
            if model.losses:
                loss += tf.add_n(model.losses)
        return tape.gradient(loss, variables)

    x = tf.TensorSpec(images.shape, images.dtype)
    y = tf.TensorSpec(labels.shape, labels.dtype)
    return {"step": graph_flops(step, x, y), "forward": graph_flops(forward, x)}


def matmul_peak_flops(dtype: str = "float32", n: int = MATMUL_N,
                      repeats: int = MATMUL_REPEATS) -> float:
    """FLOP/s of the fastest of `repeats` n x n matmuls (2 n^3 FLOPs each), after one untimed."""
    a = tf.cast(tf.random.stateless_uniform([n, n], seed=[1, 2]), dtype)
    b = tf.cast(tf.random.stateless_uniform([n, n], seed=[3, 4]), dtype)
    best = math.inf
    for i in range(repeats + 1):
        tic = time.perf_counter()
        c = tf.linalg.matmul(a, b)
        c[0, 0].numpy()  # the result exists
        if i:
            best = min(best, time.perf_counter() - tic)
    return 2.0 * n ** 3 / best


# -------------------------------------------------------------- machine
def machine_info() -> Dict[str, object]:
    """Software versions, CPU and thread settings, for every record."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "cpu_model": cpu, "cores": usable,
        "cpu_count": os.cpu_count(),
        # 0 means "TensorFlow picks" (about one thread per core for each).
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "TF_NUM_INTEROP_THREADS",
                                                   "TF_NUM_INTRAOP_THREADS") if k in os.environ},
    }


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------- stats
def _summary(values: Sequence[float]) -> Dict[str, float]:
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else float("nan")}


def _ratios(num: _Arm, den: _Arm) -> Dict[str, float]:
    """num/den per round (windows measured side by side), summarized."""
    per_round = [a / b for a, b in zip(num.rates(), den.rates())]
    s = _summary(per_round)
    return {"median": s["median"], "min": s["min"], "max": s["max"], "per_window": per_round}


def _trace_count(trainer) -> int:
    """How often the current train loop was traced (tf.function's own counter)."""
    return int(trainer.train_loop.experimental_get_tracing_count())


def target_for(prefix: str, backbone: str, arm: str = "", steps_per_loop: int = 1) -> Optional[float]:
    """The tracker's lowest acceptable median for a ratio, if it has one for this arm."""
    for low, backbones, fit_arm in TARGETS.get(prefix, ()):
        if backbones is not None and backbone not in backbones:
            continue
        if fit_arm == "spe=1" and arm != "keras_fit/spe=1":
            continue
        if fit_arm == "spe=K" and (arm != f"keras_fit/spe={steps_per_loop}" or steps_per_loop == 1
                                   or (backbone == "tiny_cnn" and steps_per_loop < 20)):
            continue
        return low
    return None


# ------------------------------------------------------------------ run
def run_benchmark(config: Config) -> List[Dict[str, object]]:
    """Benchmarks the train step for config; returns one record per arm.

    The phase is frozen when config.freeze.unfreeze_at > 0, else unfrozen.
    Records are appended to model_dir/benchmark.jsonl and printed (a table,
    then one JSON line per arm).
    """
    config = config.validated()
    # The whole run under the policy: the Keras fit arm builds its model here too.
    with precision.policy_scope(config.train.mixed_precision):
        return _run(config)


def _run(config: Config) -> List[Dict[str, object]]:
    from engine.trainer import Trainer  # here: the table helpers need no trainer

    b = config.benchmark
    compares = b.compares()
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    load_start = _loadavg()
    tic = time.perf_counter()
    trainer = Trainer(config)
    c = trainer.config
    phase = freeze.FROZEN if c.freeze.unfreeze_at > 0 else freeze.UNFROZEN
    trainer.enter_phase(phase)
    build_s = time.perf_counter() - tic

    k = c.train.steps_per_loop
    epoch_dataset = lambda: trainer.data.train_dataset(  # noqa: E731
        epoch=0, global_batch=c.train.batch_size // trainer.num_workers,
        input_size=c.model.input_size, seed=c.train.seed, augment=c.data.augment,
        num_shards=trainer.num_workers, shard_index=trainer.worker_index)
    # Synthetic: the first real batch, kept in memory and repeated.
    first_batch = next(iter(epoch_dataset()))
    synthetic = tf.data.Dataset.from_tensors(first_batch).repeat()
    # Real: the trainer's pipeline, one epoch after another (each repeat
    # re-runs the epoch's start-up work, as a new epoch in training does).
    real = epoch_dataset().repeat()

    # Each comparison: (record that carries it, ratio prefix, label, numerator, denominator).
    arms: List[_Arm] = []
    ratios: List[Tuple[str, str, str, str, str]] = []
    if b.input in (SYNTHETIC, "both") or compares:
        arms.append(_EngineArm(REFERENCE, SYNTHETIC, trainer, synthetic, k))
    if b.input in (REAL, "both"):
        arms.append(_EngineArm("engine/real", REAL, trainer, real, k))
        if b.input == "both" or compares:
            ratios.append(("engine/real", "real_over_synthetic",
                           "real / synthetic (input-bound fraction)", "engine/real", REFERENCE))
    if "keras_fit" in compares:
        for spe in sorted({1, k}):
            arm = _FitArm(trainer, synthetic, spe, jit_compile=c.train.jit_compile)
            arms.append(arm)
            ratios.append((arm.name, "engine_over_fit", f"engine / {arm.name}", REFERENCE,
                           arm.name))
    tic = time.perf_counter()

    def variant(**train) -> Config:  # the run's config with one train setting changed
        return c.replace(train=train, benchmark={"compare": "none"})

    if "ema" in compares:
        decay = 0.0 if c.train.ema_decay else EMA_DECAY
        other = Trainer(variant(ema_decay=decay))
        other.enter_phase(phase)
        arm = _EngineArm(f"engine/ema={decay or 'off'}", SYNTHETIC, other, synthetic, k)
        arms.append(arm)
        on, off = (arm.name, REFERENCE) if decay else (REFERENCE, arm.name)
        ratios.append((arm.name, "ema_over_off",
                       f"EMA {decay or c.train.ema_decay} / EMA off", on, off))
    if "frozen" in compares:
        other_phase = freeze.UNFROZEN if phase == freeze.FROZEN else freeze.FROZEN
        other = Trainer(variant())
        other.enter_phase(other_phase)
        arm = _EngineArm(f"engine/{other_phase}", SYNTHETIC, other, synthetic, k)
        arms.append(arm)
        frozen, unfrozen = ((arm.name, REFERENCE) if other_phase == freeze.FROZEN
                            else (REFERENCE, arm.name))
        ratios.append((arm.name, "frozen_over_unfrozen", "frozen / unfrozen", frozen, unfrozen))
    if "mirrored1" in compares:
        # One replica on the device the default strategy uses.
        device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
        with _trainer_strategy(distribute.mirrored_strategy([device])):
            other = Trainer(variant(strategy="mirrored"))
        other.enter_phase(phase)
        arm = _EngineArm("engine/mirrored1", SYNTHETIC, other, synthetic, k)
        arms.append(arm)
        ratios.append((arm.name, "mirrored1_over_default",
                       "mirrored x1 / default strategy", arm.name, REFERENCE))
    if "k1" in compares:
        arm = _EngineArm("engine/K=1", SYNTHETIC, trainer, synthetic, 1)
        arms.append(arm)
        ratios.append((arm.name, "k1_over_k", f"K=1 / K={k}", arm.name, REFERENCE))
    build_s += time.perf_counter() - tic
    trainers = list({id(arm.trainer): arm.trainer for arm in arms}.values())

    # FLOPs per phase (every trainer has the same architecture), peak matmul rate.
    images, labels = first_batch
    flops: Dict[str, Dict[str, int]] = {}
    tic = time.perf_counter()
    for t in trainers:
        if t.phase not in flops:
            flops[t.phase] = train_step_flops(t.model, t.loss_fn, images, labels)
    flops_s = time.perf_counter() - tic
    compute_dtype = keras.config.dtype_policy().compute_dtype
    peaks = [matmul_peak_flops(compute_dtype)]

    for i, arm in enumerate(arms):
        arm.warm_up(b.window_s)
        if i == 0 and c.train.jit_compile and not arm.xla_compiled():
            raise ConfigError(
                "--jit_compile: the engine's traced loop holds no XLA-compiled function; "
                "nothing was timed")
    traces_before = {id(t): _trace_count(t) for t in trainers}
    # A peak sample per round (~0.4 s): the best one is the machine's least
    # disturbed moment, as the windows' are.
    alternate(arms, b.windows, b.window_s,
              after_round=lambda: peaks.append(matmul_peak_flops(compute_dtype)))
    retraced = {id(t): _trace_count(t) - traces_before[id(t)] for t in trainers}
    peak = max(peaks)
    float32_peak = peak if compute_dtype == "float32" else matmul_peak_flops("float32")
    load_end = _loadavg()

    common = {
        "run_id": run_id, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **machine_info(),
        "backbone": c.model.backbone,
        "input_shape": [c.model.input_size, c.model.input_size, 3],
        "global_batch": c.train.batch_size,
        "precision": keras.config.dtype_policy().name,
        "optimizer": c.optimizer.name,
        "compare": list(compares),
        "windows": b.windows, "window_s": b.window_s,
        "build_s": build_s,
        "flops_count_s": flops_s,
        "flops_method": "tf.compat.v1.profiler float_operation on one traced train step "
                        "(forward + loss + gradients of the phase's trainable variables, "
                        "global batch; + depthwise-conv gradients); optimizer/EMA updates "
                        "not counted",
        "matmul_size": MATMUL_N,
        "matmul_peak_dtype": compute_dtype,
        "matmul_peak_samples_flops_per_sec": peaks,
        "matmul_peak_float32_flops_per_sec": float32_peak,
        "loadavg_1m_start": load_start, "loadavg_1m_end": load_end,
    }
    by_name = {arm.name: arm for arm in arms}
    records = []
    for arm in arms:
        t = arm.trainer
        rates = arm.rates()
        s = _summary(rates)
        batch = c.train.batch_size
        step_flops = flops[t.phase]
        achieved = step_flops["step"] * s["median"]
        rec = {"arm": arm.name, "engine": "tapeworks" if arm.kind == "engine" else "keras_fit",
               **common,
               "strategy": t.config.train.strategy,
               "replicas": int(t.strategy.num_replicas_in_sync),
               "frozen": t.phase == freeze.FROZEN,
               "ema_decay": t.config.train.ema_decay,
               "jit_compile": c.train.jit_compile,
               "steps_per_loop": arm.steps_per_loop, "input": arm.input,
               "median_steps_per_sec": s["median"], "min_steps_per_sec": s["min"],
               "max_steps_per_sec": s["max"], "spread_steps_per_sec": s["spread"],
               "median_examples_per_sec": s["median"] * batch,
               "min_examples_per_sec": s["min"] * batch,
               "max_examples_per_sec": s["max"] * batch,
               "spread_examples_per_sec": s["spread"],
               "time_to_first_step_s": arm.time_to_first_step_s,
               "steps_timed": sum(st for st, _ in arm.samples),
               "seconds_timed": sum(sec for _, sec in arm.samples),
               "window_steps_per_sec": rates,
               "cores_busy_median": statistics.median(arm.cores_busy),
               "flops_per_step": step_flops["step"],
               "forward_flops_per_step": step_flops["forward"],
               "achieved_flops_per_sec": achieved,
               "matmul_peak_flops_per_sec": peak,
               "fraction_of_peak": achieved / peak}
        low, backbones = PEAK_FRACTION_TARGET
        if arm.name == REFERENCE and not rec["frozen"] and c.model.backbone in backbones:
            rec["fraction_of_peak_target"] = low
            rec["fraction_of_peak_meets_target"] = rec["fraction_of_peak"] >= low
        if arm.kind == "engine":
            rec["traces"] = _trace_count(t)
            rec["retraced_during_timing"] = retraced[id(t)]
        else:
            rec["steps_per_execution"] = arm.steps_per_loop
        records.append(rec)
    by_record = {rec["arm"]: rec for rec in records}
    for carrier, prefix, label, num, den in ratios:
        r = _ratios(by_name[num], by_name[den])
        rec = by_record[carrier]
        rec.update({"ratio": prefix, "ratio_label": label,
                    f"{prefix}_median": r["median"], f"{prefix}_min": r["min"],
                    f"{prefix}_max": r["max"], f"{prefix}_per_window": r["per_window"]})
        target = target_for(prefix, c.model.backbone, carrier, c.train.steps_per_loop)
        if target is not None:
            rec[f"{prefix}_target"] = target
            rec[f"{prefix}_meets_target"] = r["median"] >= target

    print(format_table(records))
    model_dir = os.path.abspath(os.path.expanduser(c.train.model_dir))
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, "benchmark.jsonl")
    with open(path, "a") as f:
        for rec in records:
            line = json.dumps(rec)
            f.write(line + "\n")
            print(line)
    print(f"appended {len(records)} records to {path}")
    for t in trainers:
        close = getattr(getattr(t, "log", None), "close", None)
        if callable(close):
            close()
    return records


# ----------------------------------------------------------------- text
_KNOWN_RATIOS = (  # for records written before records named their ratio
    ("real_over_synthetic", "real / synthetic (input-bound fraction)"),
    ("engine_over_fit", "engine / fit"),
)


def record_ratio(rec) -> Optional[Tuple[str, str]]:
    """(prefix, label) of the ratio a record carries, if any."""
    if "ratio" in rec:
        return rec["ratio"], rec["ratio_label"]
    for prefix, label in _KNOWN_RATIOS:
        if f"{prefix}_median" in rec:
            return prefix, label
    return None


def _phase_text(rec) -> str:
    return "frozen" if rec["frozen"] else "unfrozen"


def _target_text(rec, prefix) -> str:
    if f"{prefix}_target" not in rec:
        return ""
    met = "met" if rec[f"{prefix}_meets_target"] else "MISSED"
    return f"target >= {rec[f'{prefix}_target']:g}: {met}"


def _g(value, scale=1e9, digits=2) -> str:
    return "" if value is None else f"{value / scale:.{digits}f}"


def format_table(records: Sequence[Dict[str, object]]) -> str:
    """The records of one run as a readable table (with the ratios under it)."""
    r0 = records[0]
    shape = "x".join(str(v) for v in r0["input_shape"])
    ema = f"EMA {r0['ema_decay']}" if r0["ema_decay"] else "EMA off"
    lines = [
        f"benchmark {r0['run_id']}: {r0['backbone']} {shape}, global batch {r0['global_batch']}, "
        f"{r0['precision']}, {r0['strategy']} strategy x{r0['replicas']}, {_phase_text(r0)}, {ema}, "
        f"{r0['optimizer']}" + (", XLA" if r0.get("jit_compile") else ""),
        f"machine: {r0['cpu_model']}, {r0['cores']} cores; TF {r0['tensorflow']}, "
        f"Keras {r0['keras']}, NumPy {r0['numpy']}; threads inter={r0['inter_op_threads']} "
        f"intra={r0['intra_op_threads']} (0 = TF default); load avg {r0['loadavg_1m_start']} -> "
        f"{r0['loadavg_1m_end']}",
        f"{r0['windows']} alternated windows of >= {r0['window_s']} s per arm; "
        f"first call (trace/compile + 1 step, or fit's first execution) not in the rates",
    ]
    if "matmul_peak_flops_per_sec" in r0:
        lines.append(
            f"matmul peak ({r0['matmul_size']}x{r0['matmul_size']} {r0['matmul_peak_dtype']}, "
            f"best of before and after each round): {_g(r0['matmul_peak_flops_per_sec'], 1e9, 1)} "
            f"GFLOP/s; FLOPs: TF profiler on one traced train step")
    lines += [
        "",
        f"{'arm':<20} {'input':<9} {'K':>3} {'steps/s med':>11} {'min':>9} {'max':>9} "
        f"{'spread':>7} {'examples/s':>11} {'GFLOP/step':>10} {'GFLOP/s':>8} {'% peak':>6} "
        f"{'1st step s':>10} {'cores busy':>10}",
    ]
    for r in records:
        lines.append(
            f"{r['arm']:<20} {r['input']:<9} {r['steps_per_loop']:>3} "
            f"{r['median_steps_per_sec']:>11.2f} {r['min_steps_per_sec']:>9.2f} "
            f"{r['max_steps_per_sec']:>9.2f} {100 * r['spread_steps_per_sec']:>6.1f}% "
            f"{r['median_examples_per_sec']:>11.1f} {_g(r.get('flops_per_step'), 1e9, 3):>10} "
            f"{_g(r.get('achieved_flops_per_sec'), 1e9, 1):>8} "
            f"{_g(r.get('fraction_of_peak'), 0.01, 1):>6} "
            f"{r['time_to_first_step_s']:>10.2f} {r.get('cores_busy_median', float('nan')):>10.2f}")
    ratio_lines = []
    for r in records:
        found = record_ratio(r)
        if found is None:
            continue
        prefix, label = found
        ratio_lines.append(
            f"  {label:<42} {r[f'{prefix}_median']:.3f} [{r[f'{prefix}_min']:.3f} - "
            f"{r[f'{prefix}_max']:.3f}]  {_target_text(r, prefix)}".rstrip())
    if ratio_lines:
        lines += ["", "ratios per round of side-by-side windows, median [min - max]:"] + ratio_lines
    if any(r.get("fraction_of_peak", 0) > 1 for r in records):
        lines.append("WARNING: achieved FLOP/s above the matmul peak: the machine was busy while "
                     "the peak was measured; the fractions mean nothing")
    retraced = [r.get("retraced_during_timing") for r in records if r.get("retraced_during_timing")]
    if retraced:
        lines.append(f"WARNING: the train step was retraced {retraced[0]} time(s) while timing")
    return "\n".join(lines)


def markdown_table(records: Sequence[Dict[str, object]]) -> str:
    """Records of many runs (e.g. benchmarks/run_standard.py) as markdown tables."""
    if not records:
        return "_no records_\n"
    r0 = records[0]
    peaks = [r["matmul_peak_flops_per_sec"] for r in records if "matmul_peak_flops_per_sec" in r]
    head = [
        f"Machine: {r0['cpu_model']}, {r0['cores']} cores; TensorFlow {r0['tensorflow']}, "
        f"Keras {r0['keras']}, NumPy {r0['numpy']}; threads inter={r0['inter_op_threads']} "
        f"intra={r0['intra_op_threads']} (0 = TF default); "
        f"{r0['windows']} alternated windows of >= {r0['window_s']} s per arm."
        + (f" Matmul peak ({r0['matmul_size']}^2, per run): {_g(min(peaks), 1e9, 1)} - "
           f"{_g(max(peaks), 1e9, 1)} GFLOP/s." if peaks else ""),
        "",
        "steps/s: median [min - max] over windows; spread = (max - min) / median; "
        "ratio: per round of side-by-side windows, median [min - max]; "
        "GFLOP/step: TF profiler on one traced train step (frozen: forward + head backward); "
        "% peak: GFLOP/step x median steps/s over the run's best 2048x2048 matmul; "
        "cores busy: process CPU seconds per wall second in a window (median); "
        "load: 1-minute load average at start and end.",
        "",
        "| backbone | input | batch | precision | phase | EMA | strategy | K | arm | steps/s | "
        "spread | examples/s | GFLOP/step | % peak | 1st step s | ratio | cores busy | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows, comparisons = [], []
    for r in records:
        shape = "x".join(str(v) for v in r["input_shape"][:2])
        ratio = ""
        found = record_ratio(r)
        if found is not None:
            prefix, label = found
            ratio = (f"{label}: {r[f'{prefix}_median']:.2f} [{r[f'{prefix}_min']:.2f} - "
                     f"{r[f'{prefix}_max']:.2f}]")
            comparisons.append(
                f"| {r['backbone']} {shape} | {label} | {r[f'{prefix}_median']:.3f} | "
                f"{r[f'{prefix}_min']:.3f} - {r[f'{prefix}_max']:.3f} | "
                f"{_target_text(r, prefix) or '-'} |")
        rows.append(
            f"| {r['backbone']} | {shape} | {r['global_batch']} | {r['precision']} | "
            f"{_phase_text(r)} | {r['ema_decay'] or 'off'} | {r['strategy']} x{r['replicas']} | "
            f"{r['steps_per_loop']} | {r['arm']} | "
            f"{r['median_steps_per_sec']:.2f} [{r['min_steps_per_sec']:.2f} - "
            f"{r['max_steps_per_sec']:.2f}] | {100 * r['spread_steps_per_sec']:.1f}% | "
            f"{r['median_examples_per_sec']:.1f} | {_g(r.get('flops_per_step'), 1e9, 3)} | "
            f"{_g(r.get('fraction_of_peak'), 0.01, 1)} | {r['time_to_first_step_s']:.2f} | "
            f"{ratio} | {r.get('cores_busy_median', float('nan')):.2f} | "
            f"{r['loadavg_1m_start']} - {r['loadavg_1m_end']} |")
    for r in records:
        if "fraction_of_peak_target" in r:
            comparisons.append(
                f"| {r['backbone']} {'x'.join(str(v) for v in r['input_shape'][:2])} | "
                f"achieved FLOP/s / matmul peak ({r['arm']}) | {r['fraction_of_peak']:.3f} | - | "
                f"target >= {r['fraction_of_peak_target']:g}: "
                f"{'met' if r['fraction_of_peak_meets_target'] else 'MISSED'} |")
    text = head + rows
    if comparisons:
        text += ["", "Comparisons (each arm against the run's engine/synthetic arm, per round):", "",
                 "| run | comparison | median | min - max | target |", "|---|---|---|---|---|"]
        text += comparisons
    return "\n".join(text) + "\n"
