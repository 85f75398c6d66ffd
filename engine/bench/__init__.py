"""The steps/sec harness (`--mode=benchmark`): an application of the engine.

It drives Trainers through their public API only (Trainer(config,
strategy=...), enter_phase, run_steps, train_loop) and owns no training code.

    run.py      run_benchmark(config): build the arms, time them, write the records
    arms.py     the timed arms (a run_steps loop, the engine, Keras fit) and `alternate`
    flops.py    FLOPs of one traced train step, the matmul peak
    machine.py  CPU, versions, threads, load average: the context of every record
    report.py   records as a text table (a run) and markdown tables (many runs)

Targets (what a ratio should reach) are not the library's: the standard set
script, benchmarks/run_standard.py, checks them.
"""
