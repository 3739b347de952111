"""Statistics of the overhead benchmarks: paired strategy / raw ratios with 95% intervals.

Both benchmarks time *rounds*: in each round every variant runs one block of steps, the
variants back to back (the order alternates ABBA...), so drift of clocks, power or host load
falls on both alike. The per-round ratio ``t_strategy / t_raw`` is the paired sample.

- ``median``: the median of the paired ratios, with a percentile-bootstrap 95% interval
  (robust to a block hit by a host hiccup); this is the figure the target is judged on.
- ``geomean``: ``exp(mean(log ratio))`` with a Student-t 95% interval on the log ratios.
- ``rounds_for_1pct``: rounds needed for a 95% half-width of 1% at the observed spread
  (``n * (half_width / log 1.01) ** 2``, from the median's bootstrap interval).
- ``verdict`` for a target ``ratio <= 1.01``: ``met`` (upper bound <= 1.01), ``missed``
  (lower bound > 1.01) or ``unresolved``.

``python benchmarks/_stats.py DIR`` prints the before/after table of every
``*_bench*.json`` found under ``DIR`` (what ``scripts/gpu-bench-overhead.sh`` writes).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TARGET = 1.01
CONFIDENCE = 0.95


def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` of Student's t with ``df`` degrees of freedom (Cornish-Fisher expansion
    around the normal quantile; within 4e-3 of the exact value at df = 3, 1e-3 from df = 4)."""
    if df < 1:
        raise ValueError(f"df={df} is invalid: Student's t needs at least 1 degree of freedom")
    z = statistics.NormalDist().inv_cdf(p)
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))
    n = float(df)
    return (
        z
        + (z**3 + z) / (4 * n)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * n**4)
    )


def bootstrap_median_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values`` (seeded: reproducible)."""
    if not values:
        raise ValueError("bootstrap_median_interval needs at least one value")
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    alpha = (1 - confidence) / 2
    lo = meds[int(math.floor(alpha * (resamples - 1)))]
    hi = meds[int(math.ceil((1 - alpha) * (resamples - 1)))]
    return lo, hi


def verdict(lower: float, upper: float, target: float = TARGET) -> str:
    """``met`` when the whole interval is at or below ``target``, ``missed`` when it is above."""
    if upper <= target:
        return "met"
    if lower > target:
        return "missed"
    return "unresolved"


def paired_ratio_summary(
    strategy: Sequence[float], raw: Sequence[float], steps_per_round: int = 1, target: float = TARGET
) -> dict[str, Any]:
    """Summary of the per-round ratios ``strategy[i] / raw[i]`` (block times of round ``i``)."""
    if len(strategy) != len(raw):
        raise ValueError(f"paired samples differ in length: strategy {len(strategy)}, raw {len(raw)}")
    if len(raw) < 3:
        raise ValueError(f"{len(raw)} rounds are too few for an interval: time at least 3 (--min-rounds)")
    if min(*strategy, *raw) <= 0:
        raise ValueError("block times must be positive")
    ratios = [s / r for s, r in zip(strategy, raw)]
    logs = [math.log(x) for x in ratios]
    n = len(ratios)
    median = statistics.median(ratios)
    lo, hi = bootstrap_median_interval(ratios)
    mean_log = statistics.fmean(logs)
    sd_log = statistics.stdev(logs)
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * sd_log / math.sqrt(n)
    # Half-width of the median's interval on the log scale; rounds scale with its square.
    half_med = max(math.log(hi) - math.log(median), math.log(median) - math.log(lo))
    need = math.ceil(n * (half_med / math.log(1.01)) ** 2) if half_med > 0 else n
    return {
        "rounds": n,
        "steps_per_round": steps_per_round,
        "median": median,
        "median_ci95": [lo, hi],
        "geomean": math.exp(mean_log),
        "geomean_ci95": [math.exp(mean_log - half), math.exp(mean_log + half)],
        "sd_log_ratio": sd_log,
        "rounds_for_1pct": need,
        "steps_for_1pct": need * steps_per_round,
        "verdict": verdict(lo, hi, target),
        "ratios": ratios,
    }


def step_time_summary(block_times: Sequence[float], steps_per_round: int) -> dict[str, float]:
    """Per-step time of one variant from its block times (median and mean over rounds)."""
    per_step = [t / steps_per_round for t in block_times]
    return {
        "median_step_s": statistics.median(per_step),
        "mean_step_s": statistics.fmean(per_step),
        "sd_step_s": statistics.stdev(per_step) if len(per_step) > 1 else 0.0,
    }


def fmt_ratio(summary: dict[str, Any]) -> str:
    """``1.004 [0.998, 1.011]`` for a paired-ratio summary."""
    lo, hi = summary["median_ci95"]
    return f"{summary['median']:.3f} [{lo:.3f}, {hi:.3f}]"


# ------------------------------------------------------------------------------- before / after
def _rows(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    impl = data.get("impl", {}).get("label") or path.parent.name
    out = []
    for cfg in data.get("configs", []):
        for name, cmp in cfg.get("comparisons", {}).items():
            out.append(
                {
                    "bench": data.get("bench", path.stem),
                    "config": cfg["name"],
                    "variant": name,
                    "impl": impl,
                    "time": cmp["time"],
                    "memory": cmp["memory_ratio"],
                    "raw_step_s": cfg["variants"]["raw"]["time"]["median_step_s"],
                }
            )
    return out


def before_after_table(root: Path) -> str:
    """A markdown table of every comparison found in ``root/**/*_bench*.json``, one row per
    (benchmark, configuration, variant), one column pair per implementation (before, after)."""
    rows: list[dict[str, Any]] = []
    for path in sorted(root.rglob("*_bench*.json")):
        rows.extend(_rows(path))
    if not rows:
        return f"no *_bench*.json under {root}"
    impls = sorted(dict.fromkeys(r["impl"] for r in rows), key=lambda i: (i != "before", i != "after", i))
    keys = list(dict.fromkeys((r["bench"], r["config"], r["variant"]) for r in rows))
    head = "| benchmark | config | compared | " + " | ".join(
        f"{i}: time median [95% CI] | {i}: verdict | {i}: steps for 1% | {i}: memory" for i in impls
    )
    lines = [head + " |", "|" + "---|" * (3 + 4 * len(impls))]
    for key in keys:
        cells = [*key]
        for impl in impls:
            hit = [r for r in rows if (r["bench"], r["config"], r["variant"]) == key and r["impl"] == impl]
            if not hit:
                cells += ["-"] * 4
                continue
            t = hit[0]["time"]
            cells += [fmt_ratio(t), t["verdict"], str(t["steps_for_1pct"]), f"{hit[0]['memory']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/_stats.py DIR   (DIR holds the benchmarks' JSON files)")
    print(before_after_table(Path(sys.argv[1])))
