"""Unit tests of the RL soak's arithmetic (``_soak.py``; CPU, no torch):

uv run --only-dev pytest benchmarks/test_soak.py -q -p no:cacheprovider
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _soak import (  # noqa: E402
    busy_time,
    drift,
    format_table,
    host_reference,
    logprob_tolerance,
    mean_abs_diff,
    outliers,
    phase_medians,
    summarize,
)

# pytest.approx's default here (rel 1e-6): each side is a few float64 operations (<= 10 roundings,
# relative error <= 10 * 2**-53 ~ 1e-15) written in different orders, so they agree far inside it;
# no value below was tuned to a run (issue 16 item 2).


def test_drift_compares_medians_of_the_first_and_last_tenth() -> None:
    # 20 values: tenths of 2. First tenth [10, 10] -> 10; last tenth [11, 13] -> 12.
    values = [10.0, 10.0] + [50.0] * 16 + [11.0, 13.0]
    d = drift(values)
    assert (d["n"], d["tenth"], d["first"], d["last"]) == (20, 2, 10.0, 12.0)
    assert d["drift"] == pytest.approx(0.2)


def test_drift_ignores_one_hiccup_inside_a_tenth() -> None:
    # 30 values, tenths of 3: one 100x value in the last tenth does not move its median.
    values = [100.0] * 27 + [100.0, 10_000.0, 100.5]
    assert drift(values)["drift"] == pytest.approx(0.005)


def test_drift_edges() -> None:
    assert drift([5.0])["drift"] is None  # no two tenths
    assert drift([0.0, 0.0, 0.0])["drift"] == 0.0
    assert drift([0.0, 1.0])["drift"] == math.inf
    assert drift([4.0, 2.0])["drift"] == pytest.approx(-0.5)  # n=2: tenths of one value each


def test_outlier_rule_needs_both_twice_the_median_and_a_quarter_second() -> None:
    # median 1.0: bound max(2.0, 1.25) = 2.0
    assert outliers([1.0, 1.0, 1.0, 1.9, 2.5]) == [4]
    # median 0.01: bound max(0.02, 0.26) = 0.26: 0.2 (20x the median) is still noise
    assert outliers([0.01, 0.01, 0.01, 0.2, 0.3]) == [4]
    assert outliers([]) == []


def test_logprob_tolerance_follows_the_written_formula() -> None:
    # 2 * 2^-8 * sqrt(10 * 33 + 2) * rms
    assert logprob_tolerance(33, 1.0) == pytest.approx(2 / 256 * math.sqrt(332))
    # 0.14235 is the value rounded to 5 decimals: within 5e-6 of it (abs=1e-5 covers that).
    assert logprob_tolerance(33, 1.0) == pytest.approx(0.14235, abs=1e-5)
    assert logprob_tolerance(2, 0.5) == pytest.approx(2 / 256 * math.sqrt(22) * 0.5)
    with pytest.raises(ValueError, match="num_layers=0"):
        logprob_tolerance(0, 1.0)
    with pytest.raises(ValueError, match="logit_rms=nan"):
        logprob_tolerance(2, float("nan"))


def test_mean_abs_diff() -> None:
    assert mean_abs_diff([1.0, -1.0, 0.5], [0.0, 0.0, 0.5]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="equal"):
        mean_abs_diff([1.0], [1.0, 2.0])


def _records(n: int, rss_step: float = 0.0, spike_at: int | None = None) -> list[dict]:
    out = []
    for i in range(n):
        out.append(
            {
                "iteration": i,
                "gen_s": 0.5,
                "sleep_s": 0.05,
                "train_s": 0.4,
                "push_s": 0.03,
                "wake_s": 0.02,
                "iter_s": 1.0,
                "mem_train_used": 50e9,
                "host_rss": 4e9 + rss_step * i,
                "cuda_graph_captures": 36,
                "compile_graphs": 3,
                "engine_log_captures": None,
            }
        )
    if spike_at is not None:
        out[spike_at]["gen_s"] = 3.0
    return out


def _check(it: int, diff: float, tol: float = 0.1, weights_equal: bool | None = True) -> dict:
    return {"iteration": it, "mean_abs_diff": diff, "tol": tol, "weights_equal": weights_equal}


def test_summary_passes_a_steady_run() -> None:
    s = summarize(_records(110), [_check(10, 0.01), _check(109, 0.02)], warmup=10)
    assert s["steady"] == 100
    assert s["checks"] == {"drift": "pass", "no_recompile": "pass", "logprobs": "pass", "weights": "pass"}
    assert s["passed"] is True
    assert set(s["drift"]) == {"mem_train_used", "host_rss", "iter_s"}


def test_summary_fails_a_host_memory_leak_above_one_percent() -> None:
    # +4 MB per iteration on 4 GB: the tenths are iterations 10-19 and 100-109, their medians at
    # 14.5 and 104.5 steps: 90 steps (~9 %) apart.
    s = summarize(_records(110, rss_step=4e6), [_check(10, 0.01)], warmup=10)
    assert s["checks"]["drift"] == "fail"
    assert "host_rss" in s["reasons"]["drift"]
    # rel=1e-9: medians and a ratio of sums of ~100 float64 terms (<= 100 * 2**-53 ~ 1e-14 each).
    assert s["drift"]["host_rss"]["drift"] == pytest.approx(90 * 4e6 / (4e9 + 14.5 * 4e6), rel=1e-9)
    assert s["passed"] is False


def test_summary_fails_on_a_counter_change_after_warmup_not_before() -> None:
    recs = _records(40)
    for r in recs[:5]:
        r["cuda_graph_captures"] = 0  # captured during warm-up: allowed
    assert summarize(recs, [_check(10, 0.0)], warmup=10)["checks"]["no_recompile"] == "pass"
    recs[30]["cuda_graph_captures"] = recs[31]["cuda_graph_captures"] = 37
    for r in recs[30:]:
        r["cuda_graph_captures"] = 37
    s = summarize(recs, [_check(10, 0.0)], warmup=10)
    assert s["checks"]["no_recompile"] == "fail"
    assert s["counters"]["cuda_graph_captures"] == {"at_warmup_end": 36, "last": 37, "changed": True}


def test_summary_fails_on_a_time_outlier_and_names_the_iteration() -> None:
    s = summarize(_records(40, spike_at=25), [_check(10, 0.0)], warmup=10)
    assert s["checks"]["no_recompile"] == "fail"
    assert s["time_outliers"] == {"gen_s": [25]}


def test_summary_fails_logprobs_above_tolerance_and_without_any_check() -> None:
    s = summarize(_records(40), [_check(10, 0.05), _check(35, 0.15)], warmup=10)
    assert s["checks"]["logprobs"] == "fail"
    assert "[35]" in s["reasons"]["logprobs"]
    s = summarize(_records(40), [], warmup=10)
    assert s["checks"]["logprobs"] == "not evaluated"
    assert s["passed"] is False


def test_summary_too_short_is_not_evaluated_and_not_passed() -> None:
    s = summarize(_records(11), [_check(10, 0.0)], warmup=10)
    assert s["checks"]["drift"] == "not evaluated"
    assert s["checks"]["no_recompile"] == "not evaluated"
    assert s["passed"] is False


def test_summary_without_device_memory_gates_host_and_time_only() -> None:
    s = summarize(_records(30), [_check(10, 0.0)], warmup=10, gate_device_memory=False)
    assert set(s["drift"]) == {"host_rss", "iter_s"}


def _with_tree(recs: list[dict], helper_exits_at: int | None, leak_per_it: float = 0.0) -> list[dict]:
    """Adds per-pid RSS maps: the main process (4 GB, in host_rss too), an engine child (2 GB,
    growing by ``leak_per_it`` a record) and a 6 GB helper that exits at ``helper_exits_at``."""
    for r in recs:
        i = r["iteration"]
        pids = {"100": int(r["host_rss"]), "101": int(2e9 + leak_per_it * i)}
        if helper_exits_at is None or i < helper_exits_at:
            pids["102"] = int(6e9)
        r["host_rss_pids"] = pids
        r["host_rss_tree"] = float(sum(pids.values()))
    return recs


def test_summary_gates_the_persistent_tree_not_a_helper_that_exits() -> None:
    # The helper's 6 GB leave the whole tree (12 -> 6 GB, -50 %) at iteration 40: reported, not
    # gated. The two processes alive throughout sum to exactly 6e9 in every record: drift 0.
    s = summarize(_with_tree(_records(110), helper_exits_at=40), [_check(10, 0.0)], warmup=10)
    assert s["checks"]["drift"] == "pass"
    assert "host_rss_tree" not in s["drift"]
    assert s["drift"]["host_rss_tree_persistent"]["drift"] == 0.0
    assert s["host_rss_tree_drift"]["drift"] == -0.5  # (6e9 - 12e9) / 12e9, exact in float64
    assert s["host_tree"] == {"persistent_pids": ["100", "101"], "transient_pids": {"102": [10, 39]}}
    assert "pid 102 (it 10-39)" in format_table(s, {})


def test_summary_fails_a_leak_in_a_persistent_child_process() -> None:
    # +4 MB per iteration in the engine child: medians of the tenths at 14.5 and 104.5 steps, over
    # the persistent sum 4e9 + 2e9 + 14.5 * 4e6; a helper exiting at 40 does not hide it.
    s = summarize(
        _with_tree(_records(110), helper_exits_at=40, leak_per_it=4e6), [_check(10, 0.0)], warmup=10
    )
    assert s["checks"]["drift"] == "fail"
    assert "host_rss_tree_persistent" in s["reasons"]["drift"]
    # rel=1e-9: a ratio of sums of a few float64 terms (each exact to 2**-53).
    assert s["drift"]["host_rss_tree_persistent"]["drift"] == pytest.approx(
        90 * 4e6 / (6e9 + 14.5 * 4e6), rel=1e-9
    )


def test_records_without_pid_maps_still_gate_the_whole_tree() -> None:
    recs = _records(30)
    for r in recs:
        r["host_rss_tree"] = 10e9
    s = summarize(recs, [_check(10, 0.0)], warmup=10)
    assert set(s["drift"]) == {"mem_train_used", "host_rss", "host_rss_tree", "iter_s"}
    assert "host_rss_tree_drift" not in s


def test_host_reference_does_fixed_work_and_the_table_reports_its_drift() -> None:
    # The same sum every call (the work is fixed); sum of i^2 for i < n is (n-1) n (2n-1) / 6.
    n = 1000
    a, ta = host_reference(n)
    b, tb = host_reference(n)
    assert a == b == (n - 1) * n * (2 * n - 1) // 6
    assert ta > 0 and tb > 0
    summary = summarize(_records(40), [_check(20, 0.01)], 10, gate_device_memory=False)
    summary["host_ref_drift"] = drift([0.010] * 15 + [0.0115] * 15)
    table = format_table(summary, {})
    assert "host_ref_s (host speed, not gated)" in table and "+15.000%" in table


def test_phase_medians_report_the_host_cpu_seconds_after_warmup_when_recorded() -> None:
    # Warm-up of 2: the medians are over iterations 2-4 (values 2, 3, 4 -> 3; children 0.2-0.4 -> 0.3).
    recs = [{"iter_s": float(i), "iter_cpu_s": float(i), "children_cpu_s": i / 10} for i in range(5)]
    assert phase_medians(recs, warmup=2) == {"iter_s": 3.0, "iter_cpu_s": 3.0, "children_cpu_s": 0.3}
    assert "children_cpu_s" not in phase_medians([{"iter_s": 1.0}], warmup=0)  # older runs' records


def test_summary_gates_the_engine_weights_read_back_at_the_checks() -> None:
    recs = _records(40)
    s = summarize(recs, [_check(10, 0.0), _check(35, 0.0, weights_equal=False)], warmup=10)
    assert s["checks"]["weights"] == "fail" and "[35]" in s["reasons"]["weights"]
    assert s["checks"]["logprobs"] == "pass" and s["passed"] is False  # log-probs alone do not pass it
    unread = {**_check(35, 0.0, weights_equal=None), "weights_error": "KeyError('x')"}
    s = summarize(recs, [_check(10, 0.0), unread], warmup=10)
    assert s["checks"]["weights"] == "fail" and "KeyError('x')" in s["reasons"]["weights"]
    old = [{"iteration": 10, "mean_abs_diff": 0.0, "tol": 0.1}]  # a run from before the read-back
    s = summarize(recs, old, warmup=10)
    assert s["checks"]["weights"] == "not evaluated" and s["passed"] is False
    assert "weights equal" in format_table(summarize(recs, [_check(10, 0.0)], warmup=10), {})


def test_busy_time_counts_overlapping_device_intervals_once() -> None:
    # [0, 2] and [1, 3] overlap into [0, 3]; [5, 6] apart; [5.5, 5.7] inside it; a zero-length one
    # at 10: 3 + 1 + 0 = 4, whatever the order given.
    spans = [(5.0, 6.0), (0.0, 2.0), (10.0, 10.0), (1.0, 3.0), (5.5, 5.7)]
    assert busy_time(spans) == 4.0
    assert busy_time([]) == 0.0
    assert busy_time([(1.0, 2.0), (2.0, 4.0)]) == 3.0  # touching intervals: no gap, no double count
    with pytest.raises(ValueError, match=r"ends before it starts"):
        busy_time([(2.0, 1.0)])


def test_the_table_reports_the_hosts_steal_share() -> None:
    summary = summarize(_records(40), [_check(20, 0.01)], 10, gate_device_memory=False)
    summary["host_steal"] = drift([0.0] * 15 + [0.125] * 15)
    table = format_table(summary, {})
    assert "host steal share (medians, not gated)" in table and "0.00%" in table and "12.50%" in table


def test_steal_fraction_is_steal_ticks_over_all_ticks_between_two_readings() -> None:
    import rl_soak

    # 30 of 200 ticks stolen between the readings; none of it without a reading or without ticks.
    assert rl_soak.steal_fraction((10, 1000), (40, 1200)) == 30 / 200
    assert rl_soak.steal_fraction(None, (40, 1200)) is None
    assert rl_soak.steal_fraction((10, 1000), (10, 1000)) is None
    now = rl_soak.host_cpu_ticks()
    if Path("/proc/stat").exists():  # Linux: steal is one of the summed fields
        assert now is not None and 0 <= now[0] <= now[1]
    cpu = rl_soak.current_cpu()
    assert cpu is None or 0 <= cpu < 4096


def test_peak_sampler_keeps_the_largest_reading_of_each_window() -> None:
    from _soak import PeakSampler

    # A read that steps through a fixed list and then stays at its last value: the first window
    # sees the 9 (the sampler reads at start, on its period and at the take); the next sees only
    # what comes after, never the 9 again.
    values = iter([1, 9, 3, 2])
    last = {"v": 0}

    def read() -> int:
        last["v"] = next(values, last["v"])
        return last["v"]

    s = PeakSampler(read, period_s=0.001).start()
    deadline = time.monotonic() + 5.0
    while last["v"] != 2 and time.monotonic() < deadline:  # the thread has read the whole list
        time.sleep(0.001)
    assert last["v"] == 2
    peak, n = s.take()
    assert peak == 9 and n >= 4
    peak, n = s.stop()
    assert peak == 2 and n >= 2  # the reading that opened the window and the one at stop
    with pytest.raises(ValueError, match="period_s=0"):
        PeakSampler(read, period_s=0)
    twice = PeakSampler(read).start()
    with pytest.raises(RuntimeError, match="already started"):
        twice.start()
    twice.stop()


def test_cpu_lists_parse_as_the_kernel_writes_them_and_bad_ones_say_where() -> None:
    from _soak import parse_cpu_list

    assert parse_cpu_list("0-3,8") == {0, 1, 2, 3, 8}
    assert parse_cpu_list("5") == {5}
    with pytest.raises(ValueError, match=r"at 'x'"):
        parse_cpu_list("0,x")
    with pytest.raises(ValueError, match="runs upwards"):
        parse_cpu_list("3-1")


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_pin_cpus_picks_the_fastest_cpus_and_pins_the_thread() -> None:
    import os
    import threading

    from _soak import pin_cpus

    allowed = os.sched_getaffinity(0)
    result: dict = {}

    def run() -> None:  # in a thread of its own: the test's thread keeps its affinity
        try:
            result["fast"] = pin_cpus("fastest:1", reps=1)
            result["after"] = os.sched_getaffinity(0)
            with pytest.raises(ValueError, match="K must be 1 to"):
                pin_cpus(f"fastest:{len(allowed) + 1}")
            with pytest.raises(ValueError, match="outside this process's affinity"):
                pin_cpus("100000")
        except BaseException as e:  # re-raised below, in the test's thread
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    fast = result["fast"]
    times = {int(c): s for c, s in fast["per_core_s"].items()}
    assert set(times) == allowed and len(fast["cpus"]) == 1
    assert times[fast["cpus"][0]] == min(times.values())  # the fastest one timed
    assert result["after"] == set(fast["cpus"])  # that thread runs there now
    assert os.sched_getaffinity(0) == allowed  # and this one was never moved


def test_the_soak_refuses_a_micro_batch_that_does_not_divide_the_batch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import rl_soak

    with pytest.raises(SystemExit):
        rl_soak.parse_args(["--micro-train-batch", "5"])  # 16 prompts x 4 samples = 64
    assert "--micro-train-batch=5 must divide --prompts x --samples = 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rl_soak.parse_args(["--iterations", "0"])
    assert "--iterations=0 is invalid: give 1 or more" in capsys.readouterr().err
    assert rl_soak.parse_args(["--micro-train-batch", "32"]).micro_train_batch == 32
