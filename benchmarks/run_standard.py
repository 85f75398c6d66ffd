"""The standard benchmark set: one `train_main.py --mode=benchmark` process per backbone.

    python benchmarks/run_standard.py                 # the full set, ~30 min on 2 quiet cores
    python benchmarks/run_standard.py --dry_run       # print the commands only
    python benchmarks/run_standard.py --quick --backbones=tiny_cnn   # < 1 min

The set: tiny_cnn at 32 and mobilenetv2 at 128 (global batch 32), inceptionv3
at 96 (batch 16), K = 20 steps per call, unfrozen, EMA off, float32. Each backbone is ONE
process whose arms are all timed in alternated windows against its
engine/synthetic arm (engine/benchmark.py explains the timing):

    engine/synthetic   the reference: one in-memory batch repeated
    engine/real        the training pipeline        -> real / synthetic
    keras_fit/spe=1,20 Keras model.fit, same model  -> engine / fit
    engine/ema=0.999   a second Trainer with EMA    -> EMA on / off       (target >= 0.97)
    engine/frozen      a second Trainer, frozen     -> frozen / unfrozen  (target >= 3, inceptionv3)
    engine/mirrored1   one-replica MirroredStrategy -> mirrored / default (target >= 0.95)
    engine/K=1         the same loop, 1 step a call -> K=1 / K=20

Side by side in one process, every ratio is taken between windows a few
seconds apart, so load from other users hits both sides of it. Each record
also carries FLOPs per step, achieved FLOP/s and its fraction of the
process's own best 2048x2048 matmul.

Duration (2 quiet cores): a window is whole calls of K steps lasting at
least --window_s, so at K=20 an engine window of inceptionv3 (about 1 s a
step) lasts ~20 s whatever --window_s says. Roughly: tiny_cnn 2 min,
mobilenetv2 10 min, inceptionv3 15-20 min. --quick: 3 windows of 1 s.

Every run gets its own model_dir under --work_dir; the records of all runs
(their benchmark.jsonl files) become markdown tables in --out.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (backbone, input size, global batch): inceptionv3 at batch 16, as its targets are stated.
STANDARD = (("tiny_cnn", 32, 32), ("mobilenetv2", 128, 32), ("inceptionv3", 96, 16))
COMPARE = ("keras_fit", "ema", "frozen", "mirrored1", "k1")

flags.DEFINE_boolean("quick", False, "3 windows of 1 s instead of 5 of 2 s.")
flags.DEFINE_integer("windows", 0, "Timed windows per arm (0: 5, or 3 with --quick).")
flags.DEFINE_float("window_s", 0.0, "Seconds per window (0: 2.0, or 1.0 with --quick).")
flags.DEFINE_list("backbones", [s[0] for s in STANDARD], "Which of the standard backbones to run.")
flags.DEFINE_list("compare", list(COMPARE), "--benchmark_compare of every run.")
flags.DEFINE_integer("batch_size", 0, "Global batch size of every run (0: the set's own, 16 for inceptionv3, else 32).")
flags.DEFINE_integer("steps_per_loop", 20, "K, steps per traced call (k1 compares it with 1).")
flags.DEFINE_string("mixed_precision", "float32", "Passed on: float32 or bfloat16.")
flags.DEFINE_string("work_dir", "/tmp/tapeworks_bench", "Model dirs of the runs go under here.")
flags.DEFINE_string("cache_dir", "", "Passed on as --cache_dir (empty: train_main's default).")
flags.DEFINE_string("out", os.path.join(REPO, "benchmarks", "results.md"), "The markdown file.")
flags.DEFINE_boolean("dry_run", False, "Print the commands, run nothing.")
flags.DEFINE_list("include", [], "benchmark.jsonl files of earlier runs whose records join the "
                  "table (e.g. one backbone re-run after a change: run it alone and include "
                  "the others').")
FLAGS = flags.FLAGS


def standard_runs(backbones, *, compare=COMPARE, steps_per_loop=20, mixed_precision="float32",
                  batch_size=0):
    """(tag, train_main flags) for each run of the set: one per backbone."""
    runs = []
    for backbone, size, batch in STANDARD:
        if backbone not in backbones:
            continue
        batch = batch_size or batch
        tag = f"{backbone}_{size}_b{batch}_{mixed_precision}_k{steps_per_loop}"
        runs.append((tag, [f"--backbone={backbone}", f"--input_size={size}",
                           f"--batch_size={batch}", "--unfreeze_at=0",
                           "--ema_decay=0", f"--steps_per_loop={steps_per_loop}",
                           f"--mixed_precision={mixed_precision}", "--benchmark_input=both",
                           f"--benchmark_compare={','.join(compare) or 'none'}"]))
    return runs


def main(argv):
    del argv
    unknown = [b for b in FLAGS.backbones if b not in [s[0] for s in STANDARD]]
    if unknown:
        print(f"error: --backbones: {','.join(unknown)} not in the standard set", file=sys.stderr)
        return 2
    windows = FLAGS.windows or (3 if FLAGS.quick else 5)
    window_s = FLAGS.window_s or (1.0 if FLAGS.quick else 2.0)
    root = os.path.join(FLAGS.work_dir, time.strftime("%Y%m%dT%H%M%S"))
    records, failures, durations = [], [], []
    for path in FLAGS.include:
        if not os.path.isfile(path):
            print(f"error: --include: {path} not found", file=sys.stderr)
            return 2
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    started = time.time()
    runs = standard_runs(FLAGS.backbones, compare=FLAGS.compare,
                         steps_per_loop=FLAGS.steps_per_loop,
                         mixed_precision=FLAGS.mixed_precision, batch_size=FLAGS.batch_size)
    for i, (tag, extra) in enumerate(runs):
        model_dir = os.path.join(root, tag)
        cmd = [sys.executable, os.path.join(REPO, "train_main.py"), "--mode=benchmark", *extra,
               f"--benchmark_windows={windows}", f"--benchmark_window_s={window_s}",
               f"--model_dir={model_dir}", "--noprogress"]
        if FLAGS.cache_dir:
            cmd.append(f"--cache_dir={FLAGS.cache_dir}")
        print(f"[{i + 1}/{len(runs)}] PYTHONPATH={REPO} {shlex.join(cmd)}", flush=True)
        if FLAGS.dry_run:
            continue
        os.makedirs(model_dir, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        tic = time.time()
        with open(os.path.join(model_dir, "run.log"), "w") as log:
            rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        durations.append(f"{tag} {time.time() - tic:.0f} s")
        path = os.path.join(model_dir, "benchmark.jsonl")
        if rc != 0 or not os.path.exists(path):
            failures.append(f"{tag}: exit {rc}, see {model_dir}/run.log")
            print(f"  FAILED ({failures[-1]})", flush=True)
            continue
        with open(path) as f:
            new = [json.loads(line) for line in f if line.strip()]
        records += new
        print(f"  {durations[-1]}", flush=True)
        for r in new:
            ratio = f"  {r['ratio_label']} {r[r['ratio'] + '_median']:.3f}" if "ratio" in r else ""
            print(f"  {r['arm']:<18} {r['median_steps_per_sec']:9.2f} steps/s "
                  f"(spread {100 * r['spread_steps_per_sec']:.1f}%){ratio}", flush=True)
    if FLAGS.dry_run:
        return 0
    # Imported only now: it imports TensorFlow, which this parent process
    # should not hold (threads, memory) while the runs are measured.
    from engine.benchmark import machine_info, markdown_table
    m = machine_info()
    text = [
        "# tapeworks standard benchmark",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}. Machine: {m['cpu_model']}, {m['cores']} "
        f"usable cores ({m['cpu_count']} in the machine); TensorFlow {m['tensorflow']}, "
        f"Keras {m['keras']}, Python {m['python']}.",
        "",
        f"Made by `{shlex.join(['python', 'benchmarks/run_standard.py', *sys.argv[1:]])}` "
        f"in {time.time() - started:.0f} s "
        f"({'; '.join(durations)}): one `train_main.py --mode=benchmark` process per backbone, "
        f"global batch {FLAGS.batch_size or 'per backbone (inceptionv3 16, others 32)'}, "
        f"K={FLAGS.steps_per_loop}, "
        f"--benchmark_compare={','.join(FLAGS.compare)}. Records: {root}/*/benchmark.jsonl"
        + (f" and, from earlier runs, {', '.join(FLAGS.include)}" if FLAGS.include else "") + ".",
        "",
        markdown_table(records),
    ]
    if failures:
        text += ["## Failed runs", ""] + [f"- {f}" for f in failures] + [""]
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        f.write("\n".join(text))
    print(f"wrote {FLAGS.out} ({len(records)} records, {len(failures)} failed runs)")
    return 1 if failures else 0


if __name__ == "__main__":
    app.run(main)
