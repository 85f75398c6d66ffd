"""Benchmark records as text: one run's table, many runs' markdown tables.

    format_table(records)    what --mode=benchmark prints: the arms, then the measured ratios
    markdown_table(records)  records of many runs (benchmarks/run_standard.py)
    record_ratio(record)     (prefix, label) of the ratio a record carries, if any
    cpu_flags_text(record)   the CPU's bfloat16-related flags, as the machine line shows them

Plain Python on the records' fields; no TensorFlow. A ratio's target is not
a record field the engine writes: a caller that judges the records (the
standard set script) adds `<ratio>_target` and `<ratio>_meets_target`, and
`fraction_of_peak_target`/`..._meets_target`, and the markdown shows them.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

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


def target_text(rec, prefix) -> str:
    """"target >= X: met" (or MISSED) where the record was judged for that ratio, else ""."""
    if f"{prefix}_target" not in rec:
        return ""
    met = "met" if rec[f"{prefix}_meets_target"] else "MISSED"
    return f"target >= {rec[f'{prefix}_target']:g}: {met}"


def _phase_text(rec) -> str:
    return "frozen" if rec["frozen"] else "unfrozen"


def _g(value, scale=1e9, digits=2) -> str:
    return "" if value is None else f"{value / scale:.{digits}f}"


def _ratio_text(rec, prefix, digits) -> str:
    """"median [min - max]" of the record's ratio."""
    return (f"{rec[f'{prefix}_median']:.{digits}f} [{rec[f'{prefix}_min']:.{digits}f} - "
            f"{rec[f'{prefix}_max']:.{digits}f}]")


def _versions_text(r0, tensorflow="TF") -> str:
    return (f"{r0['cpu_model']}, {r0['cores']} cores{cpu_flags_text(r0)}; "
            f"{tensorflow} {r0['tensorflow']}, "
            f"Keras {r0['keras']}, NumPy {r0['numpy']}; threads inter={r0['inter_op_threads']} "
            f"intra={r0['intra_op_threads']} (0 = TF default)")


def cpu_flags_text(r0) -> str:
    """", CPU flags: avx512f avx512_vnni; not: avx512_bf16 ..." ("" when the record has none)."""
    flags = r0.get("cpu_flags")
    if not flags:
        return ""
    have = [name for name, present in flags.items() if present]
    lacks = [name for name, present in flags.items() if not present]
    return (f", CPU flags: {' '.join(have) or 'none of ' + ' '.join(lacks)}"
            + (f"; not: {' '.join(lacks)}" if have and lacks else ""))


# ------------------------------------------------------------ one run
def format_table(records: Sequence[Dict[str, object]]) -> str:
    """The records of one run as a readable table (with the measured ratios under it)."""
    lines = _run_header(records[0]) + [
        "",
        f"{'arm':<20} {'input':<9} {'K':>3} {'steps/s med':>11} {'min':>9} {'max':>9} "
        f"{'spread':>7} {'examples/s':>11} {'GFLOP/step':>10} {'GFLOP/s':>8} {'% peak':>6} "
        f"{'1st step s':>10} {'cores busy':>10}",
    ]
    lines += [_arm_line(r) for r in records]
    ratio_lines = []
    for r in records:
        found = record_ratio(r)
        if found is not None:
            prefix, label = found
            ratio_lines.append(f"  {label:<42} {_ratio_text(r, prefix, 3)}")
    if ratio_lines:
        lines += ["", "ratios per round of side-by-side windows, median [min - max]:"] + ratio_lines
    if any(r.get("fraction_of_peak", 0) > 1 for r in records):
        lines.append("WARNING: achieved FLOP/s above the matmul peak: the machine was busy while "
                     "the peak was measured; the fractions mean nothing")
    retraced = [r.get("retraced_during_timing") for r in records if r.get("retraced_during_timing")]
    if retraced:
        lines.append(f"WARNING: the train step was retraced {retraced[0]} time(s) while timing")
    return "\n".join(lines)


def _run_header(r0) -> List[str]:
    shape = "x".join(str(v) for v in r0["input_shape"])
    ema = f"EMA {r0['ema_decay']}" if r0["ema_decay"] else "EMA off"
    lines = [
        f"benchmark {r0['run_id']}: {r0['backbone']} {shape}, global batch {r0['global_batch']}, "
        f"{r0['precision']}, {r0['strategy']} strategy x{r0['replicas']}, {_phase_text(r0)}, {ema}, "
        f"{r0['optimizer']}" + (", XLA" if r0.get("jit_compile") else ""),
        f"machine: {_versions_text(r0)}; load avg {r0['loadavg_1m_start']} -> "
        f"{r0['loadavg_1m_end']}",
        f"{r0['windows']} alternated windows of >= {r0['window_s']} s per arm; "
        f"first call (trace/compile + 1 step, or fit's first execution) not in the rates",
    ]
    if "matmul_peak_flops_per_sec" in r0:
        lines.append(
            f"matmul peak ({r0['matmul_size']}x{r0['matmul_size']} {r0['matmul_peak_dtype']}, "
            f"best of before and after each round): {_g(r0['matmul_peak_flops_per_sec'], 1e9, 1)} "
            f"GFLOP/s; FLOPs: TF profiler on one traced train step")
    return lines


def _arm_line(r) -> str:
    return (f"{r['arm']:<20} {r['input']:<9} {r['steps_per_loop']:>3} "
            f"{r['median_steps_per_sec']:>11.2f} {r['min_steps_per_sec']:>9.2f} "
            f"{r['max_steps_per_sec']:>9.2f} {100 * r['spread_steps_per_sec']:>6.1f}% "
            f"{r['median_examples_per_sec']:>11.1f} {_g(r.get('flops_per_step'), 1e9, 3):>10} "
            f"{_g(r.get('achieved_flops_per_sec'), 1e9, 1):>8} "
            f"{_g(r.get('fraction_of_peak'), 0.01, 1):>6} "
            f"{r['time_to_first_step_s']:>10.2f} {r.get('cores_busy_median', float('nan')):>10.2f}")


# ----------------------------------------------------------- many runs
def markdown_table(records: Sequence[Dict[str, object]]) -> str:
    """Records of many runs (e.g. benchmarks/run_standard.py) as markdown tables."""
    if not records:
        return "_no records_\n"
    text = _markdown_head(records) + [_markdown_row(r) for r in records]
    comparisons = _comparison_rows(records)
    if comparisons:
        text += ["", "Comparisons (each arm against the run's engine/synthetic arm, per round):", "",
                 "| run | comparison | median | min - max | target |", "|---|---|---|---|---|"]
        text += comparisons
    return "\n".join(text) + "\n"


def _markdown_head(records) -> List[str]:
    r0 = records[0]
    peaks = [r["matmul_peak_flops_per_sec"] for r in records if "matmul_peak_flops_per_sec" in r]
    return [
        f"Machine: {_versions_text(r0, 'TensorFlow')}; "
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


def _markdown_row(r) -> str:
    shape = "x".join(str(v) for v in r["input_shape"][:2])
    found = record_ratio(r)
    ratio = f"{found[1]}: {_ratio_text(r, found[0], 2)}" if found else ""
    return (f"| {r['backbone']} | {shape} | {r['global_batch']} | {r['precision']} | "
            f"{_phase_text(r)} | {r['ema_decay'] or 'off'} | {r['strategy']} x{r['replicas']} | "
            f"{r['steps_per_loop']} | {r['arm']} | "
            f"{r['median_steps_per_sec']:.2f} [{r['min_steps_per_sec']:.2f} - "
            f"{r['max_steps_per_sec']:.2f}] | {100 * r['spread_steps_per_sec']:.1f}% | "
            f"{r['median_examples_per_sec']:.1f} | {_g(r.get('flops_per_step'), 1e9, 3)} | "
            f"{_g(r.get('fraction_of_peak'), 0.01, 1)} | {r['time_to_first_step_s']:.2f} | "
            f"{ratio} | {r.get('cores_busy_median', float('nan')):.2f} | "
            f"{r['loadavg_1m_start']} - {r['loadavg_1m_end']} |")


def _comparison_rows(records) -> List[str]:
    """A row per ratio, then one per judged fraction of peak."""
    rows = []
    for r in records:
        found = record_ratio(r)
        if found is not None:
            prefix, label = found
            rows.append(
                f"| {r['backbone']} {_size(r)} | {label} | {r[f'{prefix}_median']:.3f} | "
                f"{r[f'{prefix}_min']:.3f} - {r[f'{prefix}_max']:.3f} | "
                f"{target_text(r, prefix) or '-'} |")
    for r in records:
        if "fraction_of_peak_target" in r:
            rows.append(
                f"| {r['backbone']} {_size(r)} | achieved FLOP/s / matmul peak ({r['arm']}) | "
                f"{r['fraction_of_peak']:.3f} | - | {target_text(r, 'fraction_of_peak')} |")
    return rows


def _size(r) -> str:
    return "x".join(str(v) for v in r["input_shape"][:2])
