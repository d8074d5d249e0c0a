"""One progress bar per stage: units (shards or buckets), rows, rate and ETA."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StageProgress:
    def __init__(self, stage: str, total_units: int, total_rows: int, enabled: bool = True):
        self.stage = stage
        self.total_rows = total_rows
        self.total_units = total_units
        self.rows = 0
        self.skipped_rows = 0  # finished in an earlier run: not part of this run's rate
        self.enabled = enabled
        self._progress: Progress | None = None

    def __enter__(self) -> "StageProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description:<10}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rows]} rows"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.stage, total=self.total_units, rows="0", rate="")
        return self

    def skip(self, units: int, rows: int) -> None:
        self.skipped_rows += rows
        self.advance(units, rows)

    def advance(self, units: int, rows: int) -> None:
        self.rows += rows
        if self._progress is None:
            return
        task = self._progress.tasks[0]
        elapsed = task.elapsed or 0.0
        fresh = self.rows - self.skipped_rows
        rate = f"{fresh / elapsed:,.0f} rows/s" if elapsed > 0.5 and fresh else ""
        self._progress.update(self._task, advance=units, rows=f"{self.rows:,}/{self.total_rows:,}", rate=rate)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
