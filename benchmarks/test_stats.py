"""Unit tests of the benchmarks' statistics (CPU, no torch):

uv run pytest benchmarks/test_stats.py -q -p no:cacheprovider
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import (  # noqa: E402
    before_after_table,
    bootstrap_median_interval,
    paired_ratio_summary,
    t_quantile,
    verdict,
)


@pytest.mark.parametrize(
    ("df", "exact", "tol"),
    [
        (3, 3.182446, 4e-3),
        (4, 2.776445, 1e-3),
        (10, 2.228139, 1e-4),
        (30, 2.042272, 1e-5),
        (1, 12.706205, 1e-5),
    ],
)
def test_t_quantile_matches_tables(df: int, exact: float, tol: float) -> None:
    assert abs(t_quantile(0.975, df) - exact) < tol


def test_t_quantile_rejects_zero_df() -> None:
    with pytest.raises(ValueError, match="df=0"):
        t_quantile(0.975, 0)


def _noisy(ratio: float, sd: float, n: int, seed: int = 1) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    raw = [0.1 * (1 + rng.gauss(0, 0.05)) for _ in range(n)]  # drift/noise shared by the pair
    strategy = [r * ratio * math.exp(rng.gauss(0, sd)) for r in raw]
    return strategy, raw


def test_summary_recovers_a_known_ratio_and_resolves_it() -> None:
    s, r = _noisy(1.02, 0.004, 60)
    out = paired_ratio_summary(s, r, steps_per_round=3)
    assert abs(out["median"] - 1.02) < 0.003
    lo, hi = out["median_ci95"]
    assert lo < out["median"] < hi and hi - lo < 0.01
    glo, ghi = out["geomean_ci95"]
    assert glo < 1.02 < ghi
    assert out["verdict"] == "missed"  # the whole interval is above 1.01
    assert out["rounds"] == 60 and out["steps_for_1pct"] == 3 * out["rounds_for_1pct"]
    # Shared noise of the pair (5% on raw) cancels in the ratio: far fewer rounds than 60 suffice.
    assert out["rounds_for_1pct"] < 60


def test_summary_met_and_unresolved() -> None:
    s, r = _noisy(0.99, 0.003, 40)
    assert paired_ratio_summary(s, r)["verdict"] == "met"
    s, r = _noisy(1.0, 0.05, 10)
    noisy = paired_ratio_summary(s, r)
    assert noisy["verdict"] == "unresolved"
    # 5% per-round noise: resolving 1% needs many more rounds than the 10 taken.
    assert noisy["rounds_for_1pct"] > 50


def test_summary_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        paired_ratio_summary([1.0, 1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least 3"):
        paired_ratio_summary([1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        paired_ratio_summary([1.0, 0.0, 1.0], [1.0, 1.0, 1.0])


def test_bootstrap_interval_is_reproducible_and_brackets_the_median() -> None:
    values = [1.0 + 0.01 * i for i in range(21)]
    lo, hi = bootstrap_median_interval(values)
    assert (lo, hi) == bootstrap_median_interval(values)
    assert lo < 1.10 < hi and lo >= 1.0 and hi <= 1.2


def test_verdict_edges() -> None:
    assert verdict(0.99, 1.01) == "met"
    assert verdict(1.0101, 1.02) == "missed"
    assert verdict(1.0, 1.02) == "unresolved"


def test_before_after_table(tmp_path: Path) -> None:
    for impl, ratio in (("before", 1.05), ("after", 0.995)):
        s, r = _noisy(ratio, 0.002, 20)
        cfg = {
            "name": "small",
            "variants": {"raw": {"time": {"median_step_s": 0.1}}},
            "comparisons": {"strategy": {"time": paired_ratio_summary(s, r, 3), "memory_ratio": 1.0}},
        }
        (tmp_path / impl).mkdir()
        payload = {"bench": "fsdp", "impl": {"label": impl}, "configs": [cfg]}
        (tmp_path / impl / "fsdp_bench.json").write_text(json.dumps(payload))
    text = before_after_table(tmp_path)
    lines = text.splitlines()
    assert "after: time median" in lines[0] and "before: time median" in lines[0]
    row = lines[2]
    assert row.startswith("| fsdp | small | strategy |")
    assert "missed" in row and "met" in row and row.count("1.000") == 2
