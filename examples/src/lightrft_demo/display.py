"""What rank 0 shows: a progress bar with the step's numbers, then a summary table (rich).

On a terminal the bar redraws in place; when the output is a file or a pipe (CI, ``tee``) each step
is one plain line instead, so logs stay readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["Display", "NullDisplay", "summary_rows"]


class NullDisplay:
    """What ranks other than 0 get: shows nothing."""

    def start(self, total: int, done: int) -> None:
        """Nothing to show."""

    def step(self, record: dict[str, Any]) -> None:
        """Nothing to show."""

    def message(self, text: str) -> None:
        """Nothing to show."""

    def finish(self, rows: Sequence[tuple[str, str]]) -> None:
        """Nothing to show."""


class Display(NullDisplay):
    """Rank 0's progress bar and summary table."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(highlight=False)
        self._progress: Any = None
        self._task: Any = None

    def start(self, total: int, done: int) -> None:
        if not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        fields = (
            "reward [bold]{task.fields[reward]}[/]  loss {task.fields[loss]}  KL {task.fields[kl]}  "
            "{task.fields[tps]} tok/s  sync {task.fields[sync]}"
        )
        self._progress = Progress(
            TextColumn("[bold blue]GRPO"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn(fields),
            console=self.console,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            "GRPO", total=total, completed=done, reward="-", loss="-", kl="-", tps="-", sync="-"
        )

    def step(self, record: dict[str, Any]) -> None:
        values = {
            "reward": f"{record['reward']:.3f}",
            "loss": f"{record['loss']:+.4f}",
            "kl": f"{record['kl']:.4f}",
            "tps": f"{record['tokens_per_s']:.0f}",
            "sync": f"{record['sync_s'] * 1e3:.1f} ms",
        }
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], **values)
        else:
            self.console.print(
                f"step {record['step']:4d}  reward {values['reward']}  loss {values['loss']}  "
                f"KL {values['kl']}  {values['tps']} tok/s  weight sync {values['sync']}  "
                f"{record['iter_s']:.2f} s",
                soft_wrap=True,
            )

    def message(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)

    def finish(self, rows: Sequence[tuple[str, str]]) -> None:
        from rich.table import Table

        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        table = Table(title="lightrft-demo summary", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for name, value in rows:
            table.add_row(name, value)
        self.console.print(table)


def summary_rows(
    records: Sequence[dict[str, Any]], extra: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Rows of the summary table: reward at the start and the end (means of up to 3 steps),
    throughput and weight-sync time over the whole run, then ``extra`` (paths, setup)."""
    if not records:
        return list(extra)
    k = min(3, len(records))

    def mean(key: str, rs: Sequence[dict[str, Any]]) -> float:
        return sum(r[key] for r in rs) / len(rs)

    first, last = records[:k], records[-k:]
    rows = [
        (
            "steps",
            f"{records[-1]['step']}" + (f" (resumed {_resumes(records)}x)" if _resumes(records) else ""),
        ),
        (
            "reward",
            f"{mean('reward', first):.3f} -> {mean('reward', last):.3f} "
            f"(mean of steps {first[0]['step']}-{first[-1]['step']} and {last[0]['step']}-{last[-1]['step']})",
        ),
        ("final loss / KL", f"{records[-1]['loss']:+.4f} / {records[-1]['kl']:.4f}"),
        ("generation", f"{mean('tokens_per_s', records):.0f} tokens/s (mean over steps)"),
        ("weight sync", f"{mean('sync_s', records) * 1e3:.1f} ms per step (mean)"),
        ("time per step", f"{mean('iter_s', records):.2f} s (mean)"),
    ]
    return rows + list(extra)


def _resumes(records: Sequence[dict[str, Any]]) -> int:
    return sum(1 for a, b in zip(records, records[1:]) if a.get("session") != b.get("session"))
