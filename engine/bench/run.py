"""run_benchmark(config): times the traced train step and nothing else.

    run_benchmark(config) -> one record per arm (also printed as a table and
                             appended to model_dir/benchmark.jsonl)

An arm is one way of running train steps (engine/bench/arms.py says how
arms are timed). The main arms run the engine's train loop on a synthetic
input (one in-memory batch repeated) or on the real input (the trainer's own
training pipeline, repeated so it never runs dry). --benchmark_compare adds
arms, each timed side by side with the main synthetic arm
("engine/synthetic", the reference) in the same process:

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
  bf16       a second Trainer built with --mixed_precision=bfloat16 (float32
             if the run is bfloat16): bfloat16 / float32
  xla        a second Trainer with --jit_compile on (off if the run has it
             on): XLA / no XLA. Its arm runs --benchmark_xla_steps_per_loop
             steps per call (default K): a window is whole calls, and where
             XLA is several times slower (MobileNetV2 on this CPU, DESIGN.md)
             K steps make each of its windows minutes long. Fewer steps per
             call add the per-call cost to that arm only; the k1 comparison
             measures that cost: with r = K=1 / K, XLA / no XLA reads low
             by about (1 - r) x (1/K' - 1/K) / (1 - 1/K) (first order; if
             XLA's own per-call cost is like the plain loop's).

The time to the first step of each arm (time_to_first_step_s) is reported
apart from its rates: for the xla arm it is the trace plus XLA's compile.

Each Trainer builds its own model (and optimizer, EMA) from the same config
and seed, so the arms differ only in the one thing compared. Trainers are
driven through their public API only: Trainer(config, strategy=...),
enter_phase, run_steps, and train_loop for the XLA check and trace counts.

FLOPs (engine/bench/flops.py): achieved_flops_per_sec = flops_per_step x
median steps/s; fraction_of_peak divides it by the best 2048 x 2048 matmul
timed in this process before the windows and after every round. On a busy
machine the peak reads low and the fraction high (even > 1): compare
fractions from a quiet machine only.

Each record says its own arm's precision and jit_compile (a bf16 or xla arm
differs from the run's). fraction_of_peak is against the run's matmul peak
(matmul_peak_dtype) for every arm, the bf16 arm's too.

Precision: --mixed_precision=bfloat16|float16 sets Keras' mixed policy
(engine/precision.py) for the whole run, so the fit arm's model gets it too
(the head keeps float32 logits, weights stay float32), and restores the
previous policy at the end; float16 arms train with the engine's dynamic
loss scale, the fit arm with the LossScaleOptimizer Keras' compile adds.
--jit_compile XLA-compiles each replica's forward/backward pass
(engine/steps.py) and the fit arm's train function; the run checks the
traced loop for XLA before it times anything.

Records carry measured numbers only; whether a ratio meets the project's
target is for benchmarks/run_standard.py to say.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Dict, List, Optional

import keras
import tensorflow as tf

from engine import distribute, freeze, precision
from engine.bench import flops as flop_count
from engine.bench.arms import REAL, SYNTHETIC, Arm, EngineArm, FitArm, alternate, ratios, summarize
from engine.bench.machine import loadavg, machine_info
from engine.bench.report import format_table
from engine.config import Config, ConfigError
from engine.trainer import Trainer

REFERENCE = "engine/synthetic"  # every comparison is timed against this arm
EMA_DECAY = 0.999  # --benchmark_compare=ema turns EMA on with this decay


def run_benchmark(config: Config) -> List[Dict[str, object]]:
    """Benchmarks the train step for config; returns one record per arm.

    The phase is frozen when config.freeze.unfreeze_at > 0, else unfrozen.
    Records are appended to model_dir/benchmark.jsonl and printed (a table,
    then one JSON line per arm).
    """
    config = config.validated()
    # The whole run under the policy: the Keras fit arm builds its model here too.
    with precision.policy_scope(config.train.mixed_precision):
        run = _Run(config)
        _add_arms(run)
        flops, flops_s = _count_flops(run)
        peaks, retraced = _time_arms(run)
        records = _records(run, flops, flops_s, peaks, retraced)
    print(format_table(records))
    _append(records, run.config.train.model_dir)
    return records


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A ratio of two arms' rates, per round, carried by one arm's record."""
    carrier: str  # the arm whose record carries it
    prefix: str  # its fields: <prefix>_median, _min, _max, _per_window
    label: str
    num: str
    den: str


class _Run:
    """The reference trainer, the inputs, and the arms and comparisons as they are added."""

    def __init__(self, config: Config):
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self.load_start = loadavg()
        self.build_s = 0.0  # building and tracing Trainers
        self.phases: Dict[int, str] = {}  # id(trainer) -> the phase it was entered in
        self.phase = freeze.FROZEN if config.freeze.unfreeze_at > 0 else freeze.UNFROZEN
        self.trainer = self.new_trainer(config, self.phase)
        self.config = c = self.trainer.parts.config
        self.k = c.train.steps_per_loop
        self.arms: List[Arm] = []
        self.comparisons: List[Comparison] = []

        def epoch_dataset():
            p = self.trainer.parts
            return p.data.train_dataset(
                epoch=0, global_batch=c.train.batch_size // p.num_workers,
                input_size=c.model.input_size, seed=c.train.seed, augment=c.data.augment,
                num_shards=p.num_workers, shard_index=p.worker_index)

        # Synthetic: the first real batch, kept in memory and repeated.
        self.first_batch = next(iter(epoch_dataset()))
        self.synthetic = tf.data.Dataset.from_tensors(self.first_batch).repeat()
        # Real: the trainer's pipeline, one epoch after another (each repeat
        # re-runs the epoch's start-up work, as a new epoch in training does).
        self.real = epoch_dataset().repeat()

    def new_trainer(self, config: Config, phase: str, strategy=None) -> Trainer:
        """A Trainer of config entered in phase; the time it takes counts as build_s."""
        tic = time.perf_counter()
        trainer = Trainer(config, strategy=strategy)
        trainer.enter_phase(phase)
        self.phases[id(trainer)] = phase
        self.build_s += time.perf_counter() - tic
        return trainer

    def variant(self, phase: str, train: dict, strategy=None) -> Trainer:
        """A Trainer of the run's config with some train settings changed."""
        config = self.config.replace(train=train, benchmark={"compare": "none"})
        return self.new_trainer(config, phase, strategy)

    def phase_of(self, arm: Arm) -> str:
        return self.phases[id(arm.trainer)]

    def add(self, arm: Arm, ratio: Optional[str] = None, label: str = "",
            num: str = "", den: str = REFERENCE) -> Arm:
        """Adds an arm, and the ratio its record carries (num/den default: the arm / reference)."""
        self.arms.append(arm)
        if ratio:
            self.comparisons.append(Comparison(arm.name, ratio, label, num or arm.name, den))
        return arm


# ----------------------------------------------------------------- arms
def _add_arms(run: _Run) -> None:
    """The main arms, then each comparison asked for, in a fixed order."""
    b = run.config.benchmark
    compares = b.compares()
    if b.input in (SYNTHETIC, "both") or compares:
        run.add(EngineArm(REFERENCE, SYNTHETIC, run.trainer, run.synthetic, run.k))
    if b.input in (REAL, "both"):
        compared = b.input == "both" or compares
        run.add(EngineArm("engine/real", REAL, run.trainer, run.real, run.k),
                "real_over_synthetic" if compared else None,
                "real / synthetic (input-bound fraction)")
    for name, add in _COMPARISONS.items():
        if name in compares:
            add(run)


def _add_keras_fit(run: _Run) -> None:
    for spe in sorted({1, run.k}):
        arm = FitArm(run.trainer, run.synthetic, spe, jit_compile=run.config.train.jit_compile)
        run.add(arm, "engine_over_fit", f"engine / {arm.name}", num=REFERENCE, den=arm.name)


def _add_ema(run: _Run) -> None:
    own = run.config.train.ema_decay
    decay = 0.0 if own else EMA_DECAY
    other = run.variant(run.phase, {"ema_decay": decay})
    arm = EngineArm(f"engine/ema={decay or 'off'}", SYNTHETIC, other, run.synthetic, run.k)
    on, off = (arm.name, REFERENCE) if decay else (REFERENCE, arm.name)
    run.add(arm, "ema_over_off", f"EMA {decay or own} / EMA off", num=on, den=off)


def _add_frozen(run: _Run) -> None:
    other_phase = freeze.UNFROZEN if run.phase == freeze.FROZEN else freeze.FROZEN
    other = run.variant(other_phase, {})
    arm = EngineArm(f"engine/{other_phase}", SYNTHETIC, other, run.synthetic, run.k)
    frozen, unfrozen = ((arm.name, REFERENCE) if other_phase == freeze.FROZEN
                        else (REFERENCE, arm.name))
    run.add(arm, "frozen_over_unfrozen", "frozen / unfrozen", num=frozen, den=unfrozen)


def _add_mirrored1(run: _Run) -> None:
    # One replica on the device the default strategy uses: a CPU split into
    # several devices (the test session) would give --strategy=mirrored more.
    device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
    other = run.variant(run.phase, {"strategy": "mirrored"},
                        strategy=distribute.mirrored_strategy([device]))
    arm = EngineArm("engine/mirrored1", SYNTHETIC, other, run.synthetic, run.k)
    run.add(arm, "mirrored1_over_default", "mirrored x1 / default strategy")


def _add_k1(run: _Run) -> None:
    arm = EngineArm("engine/K=1", SYNTHETIC, run.trainer, run.synthetic, 1)
    run.add(arm, "k1_over_k", f"K=1 / K={run.k}")


def _add_bf16(run: _Run) -> None:
    own = run.config.train.mixed_precision  # float32 or bfloat16 (config.py refuses float16)
    other_precision = "float32" if own == "bfloat16" else "bfloat16"
    other = run.variant(run.phase, {"mixed_precision": other_precision})
    arm = EngineArm(f"engine/{other_precision}", SYNTHETIC, other, run.synthetic, run.k)
    bf16, f32 = (arm.name, REFERENCE) if other_precision == "bfloat16" else (REFERENCE, arm.name)
    run.add(arm, "bf16_over_float32", "bfloat16 / float32", num=bf16, den=f32)


def _add_xla(run: _Run) -> None:
    own = run.config.train.jit_compile
    k = run.config.benchmark.xla_steps_per_loop or run.k
    try:
        other = run.variant(run.phase, {"jit_compile": not own})
    except ConfigError as e:  # e.g. XLA with several replicas
        raise ConfigError(f"--benchmark_compare=xla: {e}") from None
    arm = EngineArm("engine/xla=off" if own else "engine/xla", SYNTHETIC, other,
                    run.synthetic, k)
    xla, off = (REFERENCE, arm.name) if own else (arm.name, REFERENCE)
    xla_k, off_k = (run.k, k) if own else (k, run.k)
    at_k = f" (XLA at K={xla_k}, no XLA at K={off_k})" if k != run.k else ""
    run.add(arm, "xla_over_off", "XLA / no XLA" + at_k, num=xla, den=off)


_COMPARISONS = {"keras_fit": _add_keras_fit, "ema": _add_ema, "frozen": _add_frozen,
                "mirrored1": _add_mirrored1, "k1": _add_k1, "bf16": _add_bf16, "xla": _add_xla}


# --------------------------------------------------------------- timing
def _count_flops(run: _Run):
    """({phase: train_step_flops}, seconds): every trainer has the same architecture."""
    images, labels = run.first_batch
    flops: Dict[str, Dict[str, int]] = {}
    tic = time.perf_counter()
    for arm in run.arms:
        phase = run.phase_of(arm)
        if phase not in flops:
            flops[phase] = flop_count.train_step_flops(arm.trainer.parts.model,
                                                       arm.trainer.parts.loss_fn, images, labels)
    return flops, time.perf_counter() - tic


def _trace_count(trainer) -> int:
    """How often the current train loop was traced (tf.function's own counter)."""
    return int(trainer.train_loop.experimental_get_tracing_count())


def _engine_trainers(run: _Run) -> list:
    return list({id(a.trainer): a.trainer for a in run.arms if isinstance(a, EngineArm)}.values())


def _check_xla(arm: Arm) -> None:
    """An engine arm whose trainer asks for XLA must run its step under XLA (after warm-up)."""
    if (isinstance(arm, EngineArm) and arm.trainer.parts.config.train.jit_compile
            and not arm.xla_compiled()):
        raise ConfigError(
            f"--jit_compile: the traced loop of {arm.name} holds no XLA-compiled function; "
            "nothing was timed")


def _time_arms(run: _Run):
    """Warms every arm up, then alternates the windows; (peak samples, retraces per trainer)."""
    c = run.config
    compute_dtype = keras.config.dtype_policy().compute_dtype
    peaks = [flop_count.matmul_peak_flops(compute_dtype)]
    for arm in run.arms:
        arm.warm_up(c.benchmark.window_s)
        _check_xla(arm)
    trainers = _engine_trainers(run)
    before = {id(t): _trace_count(t) for t in trainers}
    # A peak sample per round (~0.4 s): the best one is the machine's least
    # disturbed moment, as the windows' are.
    alternate(run.arms, c.benchmark.windows, c.benchmark.window_s,
              after_round=lambda: peaks.append(flop_count.matmul_peak_flops(compute_dtype)))
    retraced = {id(t): _trace_count(t) - before[id(t)] for t in trainers}
    return peaks, retraced


# -------------------------------------------------------------- records
def _records(run: _Run, flops, flops_s: float, peaks: List[float], retraced) -> List[dict]:
    """One record per arm; each comparison's ratio on its carrier's record."""
    common = _common_fields(run, flops_s, peaks)
    records = [_arm_record(run, arm, common, flops[run.phase_of(arm)], retraced)
               for arm in run.arms]
    by_arm = {arm.name: arm for arm in run.arms}
    by_record = {rec["arm"]: rec for rec in records}
    for cmp in run.comparisons:
        r = ratios(by_arm[cmp.num], by_arm[cmp.den])
        by_record[cmp.carrier].update({
            "ratio": cmp.prefix, "ratio_label": cmp.label,
            f"{cmp.prefix}_median": r["median"], f"{cmp.prefix}_min": r["min"],
            f"{cmp.prefix}_max": r["max"], f"{cmp.prefix}_per_window": r["per_window"]})
    return records


def _common_fields(run: _Run, flops_s: float, peaks: List[float]) -> dict:
    """The fields every record of the run shares: machine, model, settings, the peak."""
    c, b = run.config, run.config.benchmark
    compute_dtype = keras.config.dtype_policy().compute_dtype
    peak = max(peaks)
    return {
        "run_id": run.run_id, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **machine_info(),
        "backbone": c.model.backbone,
        "input_shape": [c.model.input_size, c.model.input_size, 3],
        "global_batch": c.train.batch_size,
        "optimizer": c.optimizer.name,
        "compare": list(b.compares()),
        "windows": b.windows, "window_s": b.window_s,
        "build_s": run.build_s,
        "flops_count_s": flops_s,
        "flops_method": flop_count.METHOD,
        "matmul_size": flop_count.MATMUL_N,
        "matmul_peak_dtype": compute_dtype,
        "matmul_peak_samples_flops_per_sec": peaks,
        "matmul_peak_float32_flops_per_sec": (peak if compute_dtype == "float32"
                                              else flop_count.matmul_peak_flops("float32")),
        "loadavg_1m_start": run.load_start, "loadavg_1m_end": loadavg(),
    }


def _arm_record(run: _Run, arm: Arm, common: dict, step_flops: Dict[str, int],
                retraced: Dict[int, int]) -> dict:
    t = arm.trainer
    rates = arm.rates()
    s = summarize(rates)
    batch = run.config.train.batch_size
    peak = common["matmul_peak_samples_flops_per_sec"]
    achieved = step_flops["step"] * s["median"]
    rec = {"arm": arm.name, "engine": "tapeworks" if arm.kind == "engine" else "keras_fit",
           **common,
           "strategy": t.parts.config.train.strategy,
           "replicas": int(t.parts.strategy.num_replicas_in_sync),
           "frozen": run.phase_of(arm) == freeze.FROZEN,
           "ema_decay": t.parts.config.train.ema_decay,
           # The arm's own: a bf16 or xla arm's trainer differs from the run's.
           "precision": precision.POLICIES[t.parts.config.train.mixed_precision],
           "jit_compile": t.parts.config.train.jit_compile,
           "steps_per_loop": arm.steps_per_loop, "input": arm.input,
           **{f"{stat}_steps_per_sec": s[stat] for stat in ("median", "min", "max", "spread")},
           **{f"{stat}_examples_per_sec": s[stat] * batch for stat in ("median", "min", "max")},
           "spread_examples_per_sec": s["spread"],
           "time_to_first_step_s": arm.time_to_first_step_s,
           "steps_timed": sum(st for st, _ in arm.samples),
           "seconds_timed": sum(sec for _, sec in arm.samples),
           "window_steps_per_sec": rates,
           "cores_busy_median": statistics.median(arm.cores_busy),
           "flops_per_step": step_flops["step"],
           "forward_flops_per_step": step_flops["forward"],
           "achieved_flops_per_sec": achieved,
           "matmul_peak_flops_per_sec": max(peak),
           "fraction_of_peak": achieved / max(peak)}
    if arm.kind == "engine":
        rec["traces"] = _trace_count(t)
        rec["retraced_during_timing"] = retraced[id(t)]
    else:
        rec["steps_per_execution"] = arm.steps_per_loop
    return rec


def _append(records: List[dict], model_dir: str) -> None:
    """Appends the records to model_dir/benchmark.jsonl, printing each line."""
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, "benchmark.jsonl")
    with open(path, "a") as f:
        for rec in records:
            line = json.dumps(rec)
            f.write(line + "\n")
            print(line)
    print(f"appended {len(records)} records to {path}")
