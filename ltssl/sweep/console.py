"""The sweep's console: a compact live table (rich) of trial counts and the best result per group.

On a terminal the table redraws in place; when the output is a file or a pipe (CI, ``nohup``) a
line is printed per finished trial instead, so logs stay readable.
"""

from __future__ import annotations

import threading
import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


def default_console() -> Console:
    """The driver's console: a terminal's own width, or 140 columns in a log file (the results table)."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=140)
    return console


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class SweepBoard:
    """Trial states and best results, updated by the driver's loop, drawn by rich."""

    def __init__(self, name: str, output_dir: str, metric: str, mode: str, total: int,
                 console: Console | None = None, live: bool | None = None):
        self.name = name
        self.output_dir = output_dir
        self.metric = metric
        self.mode = mode
        self.total = total
        self.console = console or Console(highlight=False)
        self.live_enabled = self.console.is_terminal if live is None else live
        self.status: dict[str, str] = {}          # trial key -> pending/running/<result status>
        self.best: dict[str, tuple[float, str, dict]] = {}   # group -> (value, trial key, params)
        self.done_in_group: dict[str, int] = {}
        self.started = time.time()
        self._lock = threading.Lock()
        self._live: Live | None = None

    # ---------------------------------------------------------------- updates

    def set_status(self, key: str, status: str) -> None:
        with self._lock:
            self.status[key] = status

    def offer(self, group: str, key: str, value, params: dict) -> None:
        """A finished trial's metric value: kept when it is the best of its group so far."""
        if value is None:
            return
        with self._lock:
            self.done_in_group[group] = self.done_in_group.get(group, 0) + 1
            best = self.best.get(group)
            better = best is None or (value > best[0] if self.mode == "max" else value < best[0])
            if better:
                self.best[group] = (float(value), key, params)

    def counts(self) -> dict[str, int]:
        with self._lock:
            states = list(self.status.values())
        out = {s: states.count(s) for s in ("running", "completed", "stopped_early", "failed", "cancelled")}
        out["pending"] = self.total - sum(out.values())
        return out

    # ---------------------------------------------------------------- drawing

    def render(self):
        c = self.counts()
        elapsed = time.time() - self.started
        head = Text.assemble(
            (f"sweep {self.name}", "bold"),
            f"  {self.total} trials  {elapsed:,.0f} s  ",
            (f"done {c['completed'] + c['stopped_early']}", "green"),
            f" (stopped early {c['stopped_early']})  ",
            (f"running {c['running']}", "cyan"),
            f"  pending {c['pending']}  ",
            (f"failed {c['failed']}", "red" if c["failed"] else ""),
            f"  cancelled {c['cancelled']}" if c["cancelled"] else "",
        )
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("group")
        table.add_column("done", justify="right")
        table.add_column(f"best {self.metric}", justify="right")
        table.add_column("trial")
        table.add_column("its values")
        with self._lock:
            for group in sorted(self.best):
                value, key, params = self.best[group]
                shown = " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in params.items())
                table.add_row(group, str(self.done_in_group.get(group, 0)), f"{value:.4f}", key, shown)
        return Group(head, table) if self.best else head

    def start(self) -> None:
        if self.live_enabled:
            self._live = Live(get_renderable=self.render, console=self.console, refresh_per_second=2, transient=False)
            self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def log(self, message: str) -> None:
        """A line above the live table (or a plain line without one)."""
        if self._live is not None:
            self._live.console.print(message, highlight=False, markup=False)
        else:
            self.console.print(message, highlight=False, markup=False, soft_wrap=True)
            self.console.file.flush()  # a log file (nohup, CI) shows each trial's end at once
