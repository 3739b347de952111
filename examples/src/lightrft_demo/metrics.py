"""The run's metrics file (JSON lines, one record per optimizer step) and what is drawn from it.

The file is the record a user plots again (``read_metrics``); it stays consistent across a kill and
``--resume``: the resumed run first cuts it back to the steps its checkpoint contains, so no step is
missing or written twice.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "plot_reward_curve", "read_metrics"]


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics file, in order. A torn last line (the process was killed while
    writing it) is dropped; any other line that is not a JSON object is an error naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not a JSON record: {exc}") from exc
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number} is not a metrics record with an integer 'step': {line[:80]!r}")
        records.append(record)
    return records


class MetricsLog:
    """Appends one JSON line per step (flushed and fsynced, so a kill loses at most a torn line)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def restart_at(self, step: int) -> list[dict[str, Any]]:
        """Keeps the records of steps ``1..step`` (those the checkpoint being resumed contains) and
        drops later ones, rewriting the file atomically. Returns the kept records."""
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        steps = [r["step"] for r in kept]
        if steps != list(range(1, len(steps) + 1)):
            raise ValueError(
                f"{self.path} holds steps {_ranges(steps)}, not 1..{step} in order: it does not belong to "
                f"the checkpoint being resumed (step {step}); move it away or start with --overwrite"
            )
        if len(kept) != step:
            raise ValueError(
                f"{self.path} holds steps {_ranges(steps)} but the checkpoint being resumed is at step {step}: "
                "records are missing; move the file away or start with --overwrite"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        return kept

    def append(self, record: dict[str, Any]) -> None:
        """Writes one record as a JSON line and makes it durable."""
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _ranges(steps: Sequence[int]) -> str:
    if not steps:
        return "none"
    return f"{steps[0]}..{steps[-1]} ({len(steps)} records)"


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over at most ``window`` values."""
    out: list[float] = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_reward_curve(
    records: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Draws mean reward (and its moving average) and KL per step into a PNG; a dotted line marks
    each step where a run resumed from a checkpoint. Headless (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    rewards = [r["reward"] for r in records]
    fig, (ax, ax_kl) = plt.subplots(
        2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, layout="constrained"
    )
    ax.plot(steps, rewards, "o-", ms=3, lw=1, color="tab:blue", alpha=0.6, label="mean reward")
    ax.plot(steps, moving_average(rewards, 5), lw=2, color="tab:blue", label="moving average (5 steps)")
    for prev, cur in zip(records, records[1:]):
        if cur.get("session") != prev.get("session"):
            ax.axvline(cur["step"] - 0.5, ls=":", color="gray")
            ax.annotate("resumed", (cur["step"] - 0.5, 1.0), xycoords=("data", "axes fraction"),
                        ha="right", va="top", rotation=90, fontsize=8, color="gray")  # fmt: skip
    ax.set_ylabel("reward")
    ax.set_ylim(0, max(1.0, max(rewards, default=1.0)))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or "lightrft-demo: GRPO reward")
    kls = [r.get("kl", math.nan) for r in records]
    ax_kl.plot(steps, kls, lw=1.5, color="tab:red")
    ax_kl.set_ylabel("KL to reference")
    ax_kl.set_xlabel("optimizer step")
    ax_kl.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
