"""The live view of `crucible submit --wait`: a rich progress bar fed by the job's events.

One bar for the current stage (its units: tensors, examples, trials), with the percentage,
the stage's ETA and the best tuning trial so far. On a terminal the bar redraws in place;
elsewhere (CI logs, a pipe) each stage, each new best trial and the outcome print as lines.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from crucible.client import Event


def _objective(trial: dict[str, Any]) -> float | None:
    value = trial.get("objective")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def describe_trial(trial: dict[str, Any]) -> str:
    metric, value = trial.get("metric"), trial.get("value")
    score = f"{metric} {value:.4g}" if isinstance(value, int | float) else f"{trial['objective']}"
    return f"best trial {trial.get('index')}: {score}"


class CountColumn(ProgressColumn):
    """`done/total unit`, or nothing while the stage has not said how much there is."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{task.completed:.0f}/{task.total:.0f} {task.fields.get('unit', '')}")


class JobView:
    """Feed it the client's events (`on_event`); use it as a context manager."""

    def __init__(self, console: Console, job_id: str) -> None:
        self.console = console
        self.job_id = job_id
        self.live = console.is_terminal
        self.stage: str | None = None
        self.best: dict[str, Any] | None = None
        self.best_score: float | None = None
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            CountColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[best]}"),
            console=console,
            disable=not self.live,
            transient=False,
        )
        self.task: TaskID = self.progress.add_task("queued", total=None, unit="", best="")

    def __enter__(self) -> JobView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _say(self, text: str) -> None:
        if self.live:
            self.progress.console.print(text)
        else:
            self.console.print(text)

    def on_event(self, event: Event) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        if event.event == "stage":
            self._stage(data.get("stage") or "?")
        elif event.event == "progress":
            if data.get("stage") and data["stage"] != self.stage:
                self._stage(str(data["stage"]))
            total = data.get("total") or None
            self.progress.update(
                self.task, total=total, completed=data.get("done", 0), unit=data.get("unit", "")
            )
        elif event.event == "trial":
            score = _objective(data)
            if score is not None and (self.best_score is None or score > self.best_score):
                self.best, self.best_score = data, score
                self.progress.update(self.task, best=describe_trial(data))
                if not self.live:
                    self._say(f"  {describe_trial(data)}")
        elif event.event == "event" and data.get("kind") in ("error", "warning"):
            self._say(f"  {data.get('kind')}: {escape(str(data.get('message')))}")
        elif event.event == "status" and data.get("status") == "running" and self.stage is None:
            self.progress.update(self.task, description="running")

    def _stage(self, name: str) -> None:
        if name == self.stage:
            return
        self.stage = name
        # A new bar per stage: its units and its ETA are its own.
        best = describe_trial(self.best) if self.best else ""
        # reset() replaces the task's fields: all of them again.
        self.progress.reset(
            self.task, total=None, completed=0, description=name, unit="", best=best
        )
        if not self.live:
            self._say(f"stage {name}")
