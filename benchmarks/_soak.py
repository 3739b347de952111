"""The arithmetic of the RL soak (``rl_soak.py``): drift, outliers, the log-prob tolerance and the
pass checks. Pure functions over the per-iteration records (dicts from the JSONL), no torch, so
they are tested on CPU (``benchmarks/test_soak.py``) and rerun later from a JSONL alone.

Definitions (what the summary reports and gates on):

- **Warm-up**: the first ``warmup`` iterations (default 10) are left out of every check.
- **Drift** of a series ``x`` over the remaining ``n`` iterations: with ``k = max(1, n // 10)``,
  ``A = median(x[:k])`` (the first tenth) and ``B = median(x[-k:])`` (the last tenth),
  ``drift = (B - A) / A`` (0 when ``A == B == 0``; infinite when only ``A`` is 0). Medians, so one
  iteration hit by a host hiccup does not move a tenth. The check: ``|drift| <= 1 %`` for
  every gated series: device memory (allocated, reserved and used per ``mem_get_info``) after each
  phase, host RSS (this process, and the processes of its tree that live through the whole steady
  run: :func:`persistent_tree_rss`) and the iteration's time. The whole tree's RSS
  (``host_rss_tree``) is reported beside it, not gated: a helper process that exits in the run (the
  engine's compile workers do) takes its RSS out of the sum without anything being freed. It needs ``n >= 2`` (both tenths exist); with fewer it is *not evaluated*,
  which fails the run.
- **Recompile / recapture**: counters sampled after every iteration (CUDA-graph captures in this
  process, torch.compile graphs, capture lines in SGLang's log) must not change after warm-up;
  and no phase time after warm-up is an *outlier*: ``t > max(2 * median, median + 0.25 s)`` of
  that phase (a recompile or recapture costs seconds; scheduling noise is far below both bounds).
- **Log-prob tolerance** (:func:`logprob_tolerance`): see there.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

#: Largest allowed |drift| (fraction) from the first tenth to the last tenth, after warm-up.
DRIFT_LIMIT = 0.01
#: The outlier rule: t > max(OUTLIER_FACTOR * median, median + OUTLIER_MIN_EXCESS_S).
OUTLIER_FACTOR = 2.0
OUTLIER_MIN_EXCESS_S = 0.25
#: bfloat16 unit roundoff of one rounding, taken as a whole ulp (2^-8, 8 significand bits; round to
#: nearest would be half of it): the conservative end.
BF16_ULP = 2.0**-8
#: bf16-rounded intermediates on one token's path per decoder layer: input norm, q/k/v projections,
#: attention, o_proj, residual add, post-attention norm, gate/up projections, activation x up,
#: down projection, residual add.
ROUNDINGS_PER_LAYER = 10

PHASES = ("gen", "sleep", "train", "push", "wake")
MEMORY_KINDS = ("allocated", "reserved", "used")
#: Per-iteration counters that must stay constant after warm-up.
COUNTERS = ("cuda_graph_captures", "compile_graphs", "engine_log_captures")


def drift(values: Sequence[float]) -> dict[str, Any]:
    """Median of the first tenth ``A``, of the last tenth ``B`` and ``(B - A) / A`` (see the module
    docstring); ``drift`` is None when fewer than two values are given."""
    n = len(values)
    if n < 2:
        return {"n": n, "tenth": 0, "first": None, "last": None, "drift": None}
    k = max(1, n // 10)
    a = statistics.median(values[:k])
    b = statistics.median(values[-k:])
    if a == 0:
        d = 0.0 if b == 0 else math.inf
    else:
        d = (b - a) / a
    return {"n": n, "tenth": k, "first": a, "last": b, "drift": d}


def outliers(values: Sequence[float]) -> list[int]:
    """Indices (into ``values``) of the times above ``max(2 x median, median + 0.25 s)``."""
    if not values:
        return []
    med = statistics.median(values)
    bound = max(OUTLIER_FACTOR * med, med + OUTLIER_MIN_EXCESS_S)
    return [i for i, v in enumerate(values) if v > bound]


def logprob_tolerance(num_layers: int, logit_rms: float) -> float:
    """Largest allowed mean |log p_engine - log p_train| over the checked tokens.

    Both sides run the same network on the same bf16 weights (the engine received the bf16 cast of
    the master weights the training forward casts too); they differ only in kernels (accumulation
    order, fused norms, the attention implementation). Each bf16-rounded intermediate may then
    differ by up to one ulp, a relative ``u = 2^-8``. A token's path has
    ``m = 10 x num_layers + 2`` such roundings (per layer: ``ROUNDINGS_PER_LAYER``; plus the final
    norm and the LM head); independent differences add like a random walk, so the logits differ
    by a relative ``u sqrt(m)``, i.e. by ``u sqrt(m) x rms(z)`` in absolute terms, with ``rms(z)``
    the RMS of the logits (measured in the same forward). A log-prob ``z_t - logsumexp(z)`` takes
    the difference of its own logit and at most that of the softmax-weighted mean: twice it.

    ``tol = 2 u sqrt(10 L + 2) rms(z)``: 0.142 at 33 layers and ``rms(z) = 1``."""
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} is invalid: a decoder has at least one layer")
    if not logit_rms >= 0:
        raise ValueError(f"logit_rms={logit_rms} is invalid: an RMS is >= 0")
    return 2.0 * BF16_ULP * math.sqrt(ROUNDINGS_PER_LAYER * num_layers + 2) * logit_rms


def mean_abs_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """Mean |a_i - b_i| (equal lengths)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"mean_abs_diff needs two equal, non-empty sequences (got {len(a)} and {len(b)})")
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


def gated_series(record: Mapping[str, Any]) -> list[str]:
    """The keys of ``record`` whose drift is gated: device memory after each phase (those present),
    host RSS and the iteration's time. ``host_rss_tree`` is gated only in records without the
    per-pid map (runs recorded before it existed); with it, :func:`persistent_tree_rss` is."""
    keys = [f"mem_{p}_{k}" for p in PHASES for k in MEMORY_KINDS if f"mem_{p}_{k}" in record]
    tree = "host_rss_tree" if "host_rss_pids" not in record else None
    keys += [k for k in ("host_rss", tree, "iter_s") if k and k in record]
    return keys


def persistent_tree_rss(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per record, the summed RSS of the pids present in *every* record's ``host_rss_pids`` (the
    processes that live through the whole span), and the pids that were not (``transient``: pid ->
    the iterations it was seen in, as a first/last pair). A process that leaks and lives on is in
    the sum; one that starts or exits in the span is named, not summed."""
    maps = [r["host_rss_pids"] for r in records]
    if not maps:
        return {"series": [], "persistent": [], "transient": {}}
    common = set(maps[0]).intersection(*maps[1:])
    seen: dict[str, list[int]] = {}
    for r, m in zip(records, maps):
        for pid in m:
            if pid not in common:
                span = seen.setdefault(pid, [int(r["iteration"]), int(r["iteration"])])
                span[1] = int(r["iteration"])
    return {
        "series": [float(sum(m[pid] for pid in common)) for m in maps],
        "persistent": sorted(common, key=int),
        "transient": seen,
    }


def summarize(
    records: Sequence[Mapping[str, Any]],
    logprob_checks: Sequence[Mapping[str, Any]],
    warmup: int,
    gate_device_memory: bool = True,
) -> dict[str, Any]:
    """The pass checks over the per-iteration ``records`` and the periodic ``logprob_checks``
    (dicts with ``iteration``, ``mean_abs_diff`` and ``tol``). Returns the summary: per-series
    drifts, counters, outliers, log-prob results and ``checks`` (name -> "pass" / "fail" /
    "not evaluated"); ``passed`` is True only when every check passed."""
    if warmup < 0:
        raise ValueError(f"warmup={warmup} is invalid: give 0 or more iterations")
    steady = list(records[warmup:])
    checks: dict[str, str] = {}
    reasons: dict[str, str] = {}
    out: dict[str, Any] = {"iterations": len(records), "warmup": warmup, "steady": len(steady)}

    drifts: dict[str, Any] = {}
    if steady:
        for key in gated_series(steady[0]):
            if key.startswith("mem_") and not gate_device_memory:
                continue
            drifts[key] = drift([float(r[key]) for r in steady])
        if "host_rss_pids" in steady[0]:
            tree = persistent_tree_rss(steady)
            drifts["host_rss_tree_persistent"] = drift(tree["series"])
            out["host_tree"] = {"persistent_pids": tree["persistent"], "transient_pids": tree["transient"]}
            if "host_rss_tree" in steady[0]:
                out["host_rss_tree_drift"] = drift([float(r["host_rss_tree"]) for r in steady])
    out["drift"] = drifts
    phase_drifts = {}
    for p in PHASES:
        key = f"{p}_s"
        if steady and key in steady[0]:
            phase_drifts[key] = drift([float(r[key]) for r in steady])
    out["phase_time_drift"] = phase_drifts  # reported; the iteration's time is the gated one
    if not drifts or any(d["drift"] is None for d in drifts.values()):
        checks["drift"] = "not evaluated"
        reasons["drift"] = f"{len(steady)} iterations after warm-up: need at least 2"
    else:
        bad = {k: d["drift"] for k, d in drifts.items() if not abs(d["drift"]) <= DRIFT_LIMIT}
        checks["drift"] = "fail" if bad else "pass"
        if bad:
            reasons["drift"] = ", ".join(f"{k} {v:+.2%}" for k, v in bad.items())

    counters: dict[str, Any] = {}
    for c in COUNTERS:
        vals = [r[c] for r in steady if r.get(c) is not None]
        if vals:
            first = (
                records[warmup - 1][c] if warmup > 0 and records[warmup - 1].get(c) is not None else vals[0]
            )
            counters[c] = {"at_warmup_end": first, "last": vals[-1], "changed": vals[-1] != first}
    time_outliers: dict[str, list[int]] = {}
    for p in PHASES:
        key = f"{p}_s"
        if steady and key in steady[0]:
            idx = outliers([float(r[key]) for r in steady])
            if idx:
                time_outliers[key] = [int(steady[i]["iteration"]) for i in idx]
    out["counters"], out["time_outliers"] = counters, time_outliers
    if len(steady) < 2:
        checks["no_recompile"] = "not evaluated"
        reasons["no_recompile"] = f"{len(steady)} iterations after warm-up: need at least 2"
    else:
        changed = [c for c, v in counters.items() if v["changed"]]
        checks["no_recompile"] = "fail" if changed or time_outliers else "pass"
        if changed or time_outliers:
            reasons["no_recompile"] = (
                f"counters changed: {changed}; time outliers (iterations): {time_outliers}"
            )

    out["logprob_checks"] = list(logprob_checks)
    if not logprob_checks:
        checks["logprobs"] = "not evaluated"
        reasons["logprobs"] = "no periodic log-prob check ran"
    else:
        bad_lp = [c["iteration"] for c in logprob_checks if not c["mean_abs_diff"] <= c["tol"]]
        checks["logprobs"] = "fail" if bad_lp else "pass"
        if bad_lp:
            reasons["logprobs"] = f"mean |dlogp| above tolerance at iterations {bad_lp}"
    # The engine's weights read back at each check: the first rows of a few parameters equal the
    # trained model's, cast to the engine's dtype, bitwise (``weights_equal``; ``weights_error``
    # when they could not be read). Not evaluated (so not passed) when no check read them.
    read = [c for c in logprob_checks if "weights_equal" in c]
    if not read:
        checks["weights"] = "not evaluated"
        reasons["weights"] = "no check read the engine's weights back"
    else:
        bad_w = [c["iteration"] for c in read if c["weights_equal"] is not True]
        checks["weights"] = "fail" if bad_w else "pass"
        if bad_w:
            errors = sorted({c["weights_error"] for c in read if c.get("weights_error")})
            reasons["weights"] = (
                f"engine weights differ from the trained ones (or unread) at iterations {bad_w}"
                + (f": {errors}" if errors else "")
            )
    out["checks"], out["reasons"] = checks, reasons
    out["passed"] = all(v == "pass" for v in checks.values())
    return out


def sglang_request_states(engine: Any) -> int | None:
    """Request states SGLang's TokenizerManager (in this process, on the leader) holds between
    generations: 0 unless it keeps finished requests (SGLang 0.5.16's own ``n`` kept
    ``prompts x (n - 1)`` a call; the engine no longer uses it). None where it is not visible (other
    engines, other ranks)."""
    manager = getattr(getattr(engine, "engine", None), "tokenizer_manager", None)
    states = getattr(manager, "rid_to_state", None)
    return None if states is None else len(states)


def phase_medians(records: Sequence[Mapping[str, Any]], warmup: int) -> dict[str, float]:
    """Median of each timed quantity after warm-up (the table's numbers)."""
    steady = records[warmup:] or records
    keys = [f"{p}_s" for p in PHASES] + ["iter_s", "gen_tok_s", "sync_s", "train_lp_mad"]
    keys += ["iter_cpu_s", "children_cpu_s"]  # host CPU seconds: this process, the engine's processes
    return {k: statistics.median(float(r[k]) for r in steady) for k in keys if steady and k in steady[0]}


def format_table(summary: Mapping[str, Any], medians: Mapping[str, float]) -> str:
    """The human table: medians of the phases, each gated drift, the checks."""
    lines = ["quantity                         median after warm-up"]
    for k, v in medians.items():
        lines.append(f"  {k:<30} {v:.4g}")
    lines.append("drift (first tenth -> last tenth, medians)      first        last     drift")
    for k, d in summary["drift"].items():
        if d["drift"] is None:
            lines.append(f"  {k:<42} (not evaluated)")
            continue
        lines.append(f"  {k:<42} {d['first']:>11.4g} {d['last']:>11.4g} {d['drift']:>+8.3%}")
    tree = summary.get("host_rss_tree_drift")
    if tree and tree["drift"] is not None:
        lines.append(
            f"  {'host_rss_tree (reported, not gated)':<42} {tree['first']:>11.4g} {tree['last']:>11.4g} "
            f"{tree['drift']:>+8.3%}"
        )
    ref = summary.get("host_ref_drift")
    if ref and ref["drift"] is not None:
        lines.append(
            f"  {'host_ref_s (host speed, not gated)':<42} {ref['first']:>11.4g} {ref['last']:>11.4g} "
            f"{ref['drift']:>+8.3%}"
        )
    steal = summary.get("host_steal")
    if steal and steal["drift"] is not None:
        lines.append(
            f"  {'host steal share (medians, not gated)':<42} {steal['first']:>11.2%} {steal['last']:>11.2%}"
        )
    transient = summary.get("host_tree", {}).get("transient_pids", {})
    if transient:
        spans = ", ".join(f"pid {p} (it {a}-{b})" for p, (a, b) in transient.items())
        lines.append(f"  processes of the tree not alive through the run (not summed): {spans}")
    for c in summary.get("logprob_checks", []):
        stale = c.get("stale_mean_abs_diff")
        stale_txt = f", stale engine {stale:.4f}" if stale is not None else ""
        weights = c.get("weights_equal")
        weights_txt = "" if "weights_equal" not in c else f", weights {'equal' if weights else 'DIFFER'}"
        lines.append(
            f"logprob check it {c['iteration']}: mean |dlogp| {c['mean_abs_diff']:.4f} "
            f"(max {c.get('max_abs_diff', float('nan')):.4f}) tol {c['tol']:.4f}{stale_txt}{weights_txt}"
        )
    for name, status in summary["checks"].items():
        why = summary["reasons"].get(name, "")
        lines.append(f"CHECK {name:<14} {status.upper()}{': ' + why if why else ''}")
    lines.append("PASSED" if summary["passed"] else "FAILED")
    return "\n".join(lines)


def busy_time(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: the time the device was busy with at
    least one kernel, copy or fill (overlapping streams count once). An interval with
    ``end < start`` is invalid."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if end < start:
            raise ValueError(f"interval ({start}, {end}) is invalid: it ends before it starts")
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


class PeakSampler:
    """The largest value ``read()`` returned, sampled every ``period_s`` in a daemon thread: the
    device's peak memory as both sides of a comparison see it (``rl_soak.py`` and
    ``trl_grpo_compare.py`` read device-wide used memory the same way), not as each side's own
    counters do. :meth:`take` returns the peak since the previous take (the start first) and
    starts a new window; each window includes a reading at its start and at its end, so a window
    shorter than the period still has one. A peak that lasts less than ``period_s`` can be missed:
    the figure is a lower bound of the true peak, the same bound on both sides. Device-wide used
    memory rises when an allocator maps memory and stays up until it gives it back (the caching
    allocator keeps its segments until ``empty_cache``), so its peaks outlast the 20 ms default;
    a shorter period takes the GIL from a host-bound loop more often."""

    def __init__(self, read: Any, period_s: float = 0.02) -> None:
        if not period_s > 0:
            raise ValueError(f"period_s={period_s} is invalid: give a positive number of seconds")
        self.read, self.period_s = read, period_s
        self._lock = threading.Lock()
        self._peak: float | None = None
        self._samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        value = self.read()
        with self._lock:
            self._samples += 1
            if self._peak is None or value > self._peak:
                self._peak = value

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def start(self) -> PeakSampler:
        if self._thread is not None:
            raise RuntimeError("PeakSampler.start: already started")
        self._sample()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)
        self._thread.start()
        return self

    def take(self) -> tuple[float, int]:
        """(the peak since the last take, samples in the window); the next window starts now."""
        self._sample()
        with self._lock:
            peak, n = self._peak, self._samples
            self._peak, self._samples = None, 0
        self._sample()
        return peak, n

    def stop(self) -> tuple[float, int]:
        """Ends the thread; returns what :meth:`take` would."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.take()


# ------------------------------------------------------------------ live Python objects
#: Type names the census reports (the ones that grew most since the first census).
CENSUS_TOP = 12


def live_objects() -> tuple[int, float]:
    """(number of objects the cyclic garbage collector tracks now, seconds the count took). No
    collection first: the count includes garbage that awaits the next collection, so read a trend,
    not a single value. What vLLM's sleep (``gc.collect()``) walks is this set."""
    t0 = time.perf_counter()
    n = len(gc.get_objects())
    return n, time.perf_counter() - t0


#: The host reference's fixed work: sums of squares over this many integers, in pure Python.
HOST_REFERENCE_N = 200_000


def host_reference(n: int = HOST_REFERENCE_N) -> tuple[int, float]:
    """(the result, seconds) of a fixed pure-Python workload (about 10 ms): the host's speed,
    timed each iteration outside the phases. When the iteration time drifts together with it, the
    machine changed, not the loop (the 2026-12-03 soak: iteration time +13 % while every phase and
    the process's CPU seconds moved together). Reported beside the gated drift, never gated."""
    t0 = time.perf_counter()
    total = 0
    for i in range(n):
        total += i * i
    return total, time.perf_counter() - t0


def time_on_cpus(cpus: set[int] | None, reps: int = 5) -> float:
    """Median seconds of :func:`host_reference` over ``reps`` runs with the calling thread pinned
    to ``cpus`` (None: left as it is). The pinning stays: the caller restores what it needs."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    return statistics.median(host_reference()[1] for _ in range(reps))


def parse_cpu_list(text: str) -> set[int]:
    """``"0-3,8"`` -> ``{0, 1, 2, 3, 8}`` (the kernel's cpulist format)."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"CPU list {text!r} is invalid at {part!r}: give numbers and ranges, e.g. 0-3,8")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"CPU list {text!r} is invalid at {part!r}: a range runs upwards")
        out.update(range(first, last + 1))
    return out


def pin_cpus(spec: str, reps: int = 5) -> dict[str, Any]:
    """Pins the calling thread (and the threads and processes it starts later, which inherit
    it) to the CPUs ``spec`` names: a CPU list (:func:`parse_cpu_list`) or ``fastest:K``, the K
    CPUs of the current affinity on which :func:`host_reference` ran fastest, each timed alone
    (a host whose cores differ in speed, e.g. a guest whose cores share physical ones with other
    guests). Returns what was chosen and each CPU's time."""
    allowed = os.sched_getaffinity(0)
    per_core: dict[int, float] = {}
    if spec.startswith("fastest:"):
        k_text = spec.split(":", 1)[1]
        if not k_text.isdigit() or not 1 <= int(k_text) <= len(allowed):
            raise ValueError(
                f"--pin-cpus {spec!r} is invalid: K must be 1 to {len(allowed)} (the CPUs allowed)"
            )
        try:
            per_core = {cpu: time_on_cpus({cpu}, reps) for cpu in sorted(allowed)}
        finally:
            os.sched_setaffinity(0, allowed)
        chosen = set(sorted(per_core, key=per_core.get)[: int(k_text)])
    else:
        chosen = parse_cpu_list(spec)
        if not chosen <= allowed:
            raise ValueError(
                f"--pin-cpus {spec!r} is invalid: CPUs {sorted(chosen - allowed)} are outside this "
                f"process's affinity {sorted(allowed)}"
            )
    os.sched_setaffinity(0, chosen)
    return {"spec": spec, "cpus": sorted(chosen), "per_core_s": {str(c): t for c, t in per_core.items()}}


def _type_name(o: Any) -> str:
    t = type(o)
    mod = getattr(t, "__module__", "") or ""
    return t.__qualname__ if mod == "builtins" else f"{mod}.{t.__qualname__}"


def type_census() -> Counter[str]:
    """Counts of gc-tracked objects by type name (``module.QualName``; builtins bare), after a full
    collection (so garbage does not count)."""
    gc.collect()
    return Counter(_type_name(o) for o in gc.get_objects())


def census_growth(
    first: Mapping[str, int], now: Mapping[str, int], top: int = CENSUS_TOP
) -> list[dict[str, Any]]:
    """The ``top`` types whose count grew most from ``first`` to ``now``: name, count, growth."""
    grown = [(now[k] - first.get(k, 0), k) for k in now if now[k] > first.get(k, 0)]
    grown.sort(key=lambda x: (-x[0], x[1]))
    return [{"type": k, "count": now[k], "growth": d} for d, k in grown[:top]]
