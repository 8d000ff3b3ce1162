"""The shared rich console and the progress bar every long stage uses (rate and ETA)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def stage_progress(disable: bool = False) -> Progress:
    """A bar with done/total, a tokens-per-second field (`rate`), elapsed time and ETA
    (`disable`: for the other processes of a distributed run)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=False, disable=disable,
    )
