"""How steady the host's CPU is, core by core and over time (issue 17's 1 % time gate).

The soak's fixed pure-Python workload (``_soak.host_reference``, about 10 ms) took 0.010 s in some
iterations and 0.019 s in others on the H200's host, in stretches. This tells the causes apart on
an otherwise idle host (``python benchmarks/host_probe.py --out DIR``):

1. **Per core**: pinned to each CPU of this process's affinity in turn, the reference's median of
   ``--reps`` runs. Cores that differ point to placement (a process that migrates changes speed).
2. **Over time**: ``--rounds`` rounds ``--gap-s`` apart; each times the reference pinned to the
   fastest core, pinned to the slowest, and unpinned, and reads the steal share of all CPUs since
   the previous round (``rl_soak.host_cpu_ticks``). One core's speed that moves from round to
   round, with the others, and with steal, points to the host (the hypervisor, other guests), which
   no setting of this process can fix.

Table on stdout, ``--out``/host_probe.json. The affinity is restored at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _soak  # noqa: E402
import rl_soak  # noqa: E402


def spread(values: list[float]) -> dict[str, float]:
    """min, median, max and (max - min) / median of ``values`` (not empty)."""
    med = statistics.median(values)
    return {
        "min": min(values),
        "median": med,
        "max": max(values),
        "range_over_median": (max(values) - min(values)) / med if med else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="reference runs per measurement")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--gap-s", type=float, default=0.2, help="seconds between rounds")
    ap.add_argument("--out", default="/tmp/host_probe")
    a = ap.parse_args(argv)
    for name in ("reps", "rounds"):
        if getattr(a, name) < 1:
            ap.error(f"--{name}={getattr(a, name)} is invalid: give 1 or more")
    if not hasattr(os, "sched_setaffinity"):
        print("host_probe: this platform cannot pin a process to a CPU (no os.sched_setaffinity)")
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = os.sched_getaffinity(0)
    try:
        per_core = {cpu: _soak.time_on_cpus({cpu}, a.reps) for cpu in sorted(start)}
        fast = min(per_core, key=per_core.get)
        slow = max(per_core, key=per_core.get)
        rounds: list[dict[str, Any]] = []
        ticks = rl_soak.host_cpu_ticks()
        for i in range(a.rounds):
            time.sleep(a.gap_s)
            now = rl_soak.host_cpu_ticks()
            rounds.append(
                {
                    "round": i,
                    "fast_core_s": _soak.time_on_cpus({fast}, a.reps),
                    "slow_core_s": _soak.time_on_cpus({slow}, a.reps),
                    "unpinned_s": _soak.time_on_cpus(start, a.reps),
                    "steal_frac": rl_soak.steal_fraction(ticks, now),
                }
            )
            ticks = now
    finally:
        os.sched_setaffinity(0, start)
    steal = [r["steal_frac"] for r in rounds if r["steal_frac"] is not None]
    result = {
        "args": vars(a),
        "host": rl_soak.host_topology(),
        "per_core_s": {str(k): v for k, v in per_core.items()},
        "per_core": spread(list(per_core.values())),
        "fast_core": fast,
        "slow_core": slow,
        "over_time": {
            key: spread([r[key] for r in rounds]) for key in ("fast_core_s", "slow_core_s", "unpinned_s")
        },
        "steal": spread(steal) if steal else None,
        "rounds": rounds,
    }
    with open(out / "host_probe.json", "w") as f:
        json.dump(result, f, indent=2)
    print(format_table(result))
    return 0


def format_table(r: dict[str, Any]) -> str:
    def row(label: str, s: dict[str, float], scale: float = 1e3, unit: str = "ms") -> str:
        return (
            f"  {label:<34} {s['min'] * scale:8.2f} {s['median'] * scale:8.2f} {s['max'] * scale:8.2f} {unit}"
            f"   (max - min) / median {s['range_over_median']:6.1%}"
        )

    host = r["host"]
    lines = [
        f"host: {host['model']}, {host['cpu_count']} CPUs, affinity {host['affinity']}",
        f"  {'the reference (median of ' + str(r['args']['reps']) + ')':<34} {'min':>8} {'median':>8} {'max':>8}",
        row(f"across {len(r['per_core_s'])} cores, pinned", r["per_core"]),
    ]
    for key, label in (
        ("fast_core_s", f"over time, core {r['fast_core']} (fastest)"),
        ("slow_core_s", f"over time, core {r['slow_core']} (slowest)"),
        ("unpinned_s", "over time, unpinned"),
    ):
        lines.append(row(label, r["over_time"][key]))
    if r["steal"]:
        s = r["steal"]
        lines.append(f"  {'steal share per round':<34} {s['min']:8.2%} {s['median']:8.2%} {s['max']:8.2%}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
