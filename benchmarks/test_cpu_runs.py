"""The benchmark scripts run on CPU, each in a process of its own (they start torch.distributed),
with the conditions they depend on set here: one thread, no GPU, a fixed hash seed.

uv run pytest benchmarks/test_cpu_runs.py -q -p no:cacheprovider
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 600  # a hang fails the test instead of the CI job


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONHASHSEED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # one process of its own, whatever shell runs the tests
    return subprocess.run(
        [sys.executable, str(HERE / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed", "raw"])
def test_train_step_profile_times_each_part_of_the_step(tmp_path: Path, strategy: str) -> None:
    r = run(
        "train_step_profile.py",
        *("--device", "cpu", "--model", "tiny", "--strategy", strategy),
        *("--warmup", "1", "--steps", "2", "--out", str(tmp_path)),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "profile.json").read_text())
    assert len(res["steps"]) == 2
    for step in res["steps"]:
        # enqueue is read before the final sync, wall after it: never more
        assert 0 < step["enqueue_s"] <= step["wall_s"]
        assert math.isfinite(step["loss"]) and step["lp_mad"] > 0
    p = res["profiled"]
    assert set(p["parts_host_s"]) == {"fwd", "loss", "bwd", "step"}
    assert all(v > 0 for v in p["parts_host_s"].values())
    assert p["device_busy_s"] is None and p["device_idle_share"] is None  # no device on CPU
    assert p["top_ops"] and all(o["self_cpu_s"] >= 0 for o in p["top_ops"])
    assert res["python_profiled"]["top"] and (tmp_path / "python.pstats").stat().st_size > 0
    assert f"{strategy} " in r.stdout and "host time per part" in r.stdout


def test_train_step_profile_refuses_an_unknown_setting_naming_it(tmp_path: Path) -> None:
    r = run("train_step_profile.py", "--device", "cpu", "--model", "tiny", "--set", "no_such_field=1")
    assert r.returncode == 2 and "no_such_field is not a StrategyConfig field" in r.stderr
    r = run("train_step_profile.py", "--device", "cpu", "--model", "tiny", "--set", "zero_stage=7")
    assert r.returncode == 1 and "zero_stage" in r.stderr  # the config's own error, naming the field
    r = run("train_step_profile.py", "--device", "cpu", "--set", "nofieldvalue")
    assert r.returncode == 2 and "--set 'nofieldvalue' is invalid" in r.stderr


def test_rl_soak_dry_run_pinned_checks_the_engine_and_records_the_host(tmp_path: Path) -> None:
    r = run(
        "rl_soak.py",
        *("--device", "cpu", "--engine", "hf", "--model", "tiny", "--strategy", "fsdp"),
        *("--iterations", "3", "--warmup", "1", "--check-every", "1", "--pin-cpus", "fastest:1"),
        *("--out", str(tmp_path)),
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    # Exit 0 exactly when every check passed; on 2 steady iterations only the drift (host RSS,
    # time) may fail: the engine's checks must pass.
    assert r.returncode == (0 if summary["passed"] else 1), r.stdout[-3000:] + r.stderr[-3000:]
    checks = summary["checks"]
    assert checks["logprobs"] == checks["weights"] == checks["no_recompile"] == "pass", summary["reasons"]
    assert set(checks) == {"drift", "no_recompile", "logprobs", "weights"}
    pinned = summary["pinned"]
    assert len(pinned["cpus"]) == 1 and pinned["per_core_s"]
    records = [json.loads(line) for line in (tmp_path / "iterations.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for rec in records:
        assert rec["main_cpu"] in (None, *pinned["cpus"])  # the loop ran where it was pinned
        assert "host_steal_frac" in rec and rec["train_s"] > 0
        assert "mem_peak_used" not in rec  # no device: nothing sampled
    assert summary["peak_used_steady"] is None


def test_host_probe_times_every_core_and_restores_the_affinity(tmp_path: Path) -> None:
    r = run("host_probe.py", "--rounds", "2", "--reps", "1", "--gap-s", "0.01", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "host_probe.json").read_text())
    assert set(res["per_core_s"]) == {str(c) for c in os.sched_getaffinity(0)}
    assert len(res["rounds"]) == 2
    for key in ("fast_core_s", "slow_core_s", "unpinned_s"):
        s = res["over_time"][key]
        assert 0 < s["min"] <= s["median"] <= s["max"]
    assert res["per_core_s"][str(res["fast_core"])] == res["per_core"]["min"]
