"""The monitor's screen: pure functions from a view (``Model.view``) to rich
renderables. Nothing here asks the broker anything.

Every line is cut to the width, never wrapped, and the whole fits the
height: at 80x24 the less useful columns go, and lists end in "... N more".
Colour says state: a job's state, a worker's, and a worker losing liveness
(yellow once a heartbeat is half an interval late, red with one interval
left before the broker declares it dead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

STATE_STYLES = {
    "queued": "yellow", "running": "cyan", "succeeded": "green",
    "failed": "red", "cancelled": "magenta",
}
WORKER_STYLES = {"idle": "green", "busy": "cyan", "draining": "magenta"}
LATE, DYING = "yellow", "red"
# Screens at least this wide show the workers and usage side by side.
WIDE = 150
BLOCKS = "▂▃▄▅▆▇█"


# Pieces shared with mspctl.

# C0 and C1 control characters, DEL: a job's name, error or message is the
# user's text and must not move the cursor or recolour the screen.
_CONTROL = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)], "\ufffd")


def printable(text: str, lines: bool = False) -> str:
    """``text`` safe to show in a terminal: on one line, or keeping its
    line breaks (``lines``)."""
    if lines:
        return "\n".join(line.translate(_CONTROL)
                         for line in text.splitlines())
    return text.translate(_CONTROL)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def clock(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t).strftime("%H:%M:%S")


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def progress_bar(value: float | None, width: int = 10) -> Text:
    """``━━━━━━━━── 80%``; empty when there is no progress to show."""
    if value is None:
        return Text("")
    value = min(max(value, 0.0), 1.0)
    done = round(value * width)
    bar = Text("━" * done, style=STATE_STYLES["running"])
    bar.append("━" * (width - done), style="bright_black")
    bar.append(f" {value:4.0%}")
    return bar


def sparkline(values: list[int]) -> Text:
    """One character a value; a dim floor for none."""
    top = max(values, default=0)
    line = Text()
    for v in values:
        if v <= 0:
            line.append("▁", style="bright_black")
        else:
            line.append(BLOCKS[min(len(BLOCKS) - 1,
                                   math.ceil(v / top * len(BLOCKS)) - 1)])
    return line


def liveness_style(left: float, liveness: int) -> str:
    """Yellow once the worker is half an interval late, red with one
    interval left; healthy workers heartbeat every interval."""
    if left <= 1.0:
        return DYING
    if left < liveness - 1.5:
        return LATE
    return ""


def job_label(job: dict) -> str:
    return printable(job.get("name") or Path(job.get("script") or "-").name)


def job_duration(job: dict, now: float) -> float | None:
    if job.get("started_at") is None:
        return None
    return (job.get("finished_at") or now) - job["started_at"]


# Tables whose columns come and go with the width.

@dataclass(frozen=True)
class Col:
    header: str
    cell: Callable[[dict], object]
    width: int
    # Lower stays longer as the screen narrows.
    rank: int = 0
    # Takes what room is left (the width is then its minimum).
    flex: bool = False
    justify: str = "left"


def fit(cols: list[Col], width: int) -> list[Col]:
    """The columns that fit in ``width``, most important first, in their
    own order."""
    chosen, used = set(), 0
    for col in sorted(cols, key=lambda c: c.rank):
        need = col.width + (1 if chosen else 0)
        if used + need <= width:
            chosen.add(col.header)
            used += need
    return [c for c in cols if c.header in chosen]


def table(cols: list[Col], rows: list[dict], width: int, more: int = 0,
          row_style: Callable[[dict], str] | None = None) -> Table:
    """One line a row, cut to ``width``; a last line says what is left
    out."""
    cols = fit(cols, width)
    t = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False,
              header_style="bold", expand=True, width=width,
              show_edge=False, collapse_padding=True)
    for col in cols:
        t.add_column(
            col.header, justify=col.justify, no_wrap=True,
            overflow="ellipsis", ratio=1 if col.flex else None,
            min_width=col.width if col.flex else None,
            width=None if col.flex else col.width,
        )
    for row in rows:
        cells = []
        for col in cols:
            value = col.cell(row)
            if not isinstance(value, Text):
                value = Text(printable(str(value)))
            cells.append(value)
        t.add_row(*cells, style=row_style(row) if row_style else None)
    # The note goes where there is room: the first flexible column.
    note = None
    if more:
        note = Text(f"… {more} more", style="italic")
    elif not rows:
        note = Text("none", style="bright_black")
    if note is not None:
        at = next((i for i, c in enumerate(cols) if c.flex), 0)
        t.add_row(*[note if i == at else "" for i in range(len(cols))])
    return t


def _worker_cols(view: dict) -> list[Col]:
    liveness = view["liveness"]

    def late(w: dict) -> str:
        return liveness_style(w["liveness"], liveness)

    def silent(w: dict) -> Text:
        return Text(f"{w['silent_seconds']:.1f}s", style=late(w))

    def left(w: dict) -> Text:
        full = min(liveness, 8)
        bars = min(full, math.ceil(w["liveness"] * full / liveness))
        return Text("▮" * bars + "▯" * (full - bars), style=late(w) or "green")

    def state(w: dict) -> Text:
        return Text(w["state"], style=WORKER_STYLES.get(w["state"], ""))

    return [
        Col("worker", lambda w: Text(printable(w["name"]), style=late(w)),
            8, 0, flex=True),
        Col("state", state, 8, 0),
        Col("job", lambda w: "-" if w["job"] is None else w["job"], 6, 1,
            justify="right"),
        Col("on job", lambda w: duration(w["job_seconds"]), 7, 2,
            justify="right"),
        Col("last hb", silent, 7, 1, justify="right"),
        Col("live", left, max(4, min(liveness, 8)), 3),
        Col("done", lambda w: w["jobs_done"], 5, 2, justify="right"),
        Col("progress", lambda w: progress_bar(w.get("progress")), 15, 4),
        Col("host", lambda w: w["host"] or "-", 10, 5, flex=True),
        Col("pid", lambda w: w.get("pid") or "-", 7, 7, justify="right"),
        Col("joined", lambda w: clock(w.get("joined")), 8, 8),
    ]


def _job_cols(view: dict) -> list[Col]:
    now = view["time"]

    def label(j: dict) -> Text:
        text = job_label(j)
        if j.get("args"):
            text += " " + printable(" ".join(j["args"]))
        return Text(text)

    def state(j: dict) -> Text:
        text = state_text(j["state"])
        if j.get("cancel_requested") and j["state"] == "running":
            text.append(" ✕", style=STATE_STYLES["cancelled"])
        return text

    def attempts(j: dict) -> str:
        return f"{j['attempts']}/{j.get('max_attempts') or '?'}"

    def note(j: dict) -> Text:
        error = (j.get("error") or "").strip()
        if error:
            return Text(printable(error.splitlines()[0]), style="red")
        return Text(printable(j.get("message") or ""))

    cols = [
        Col("job", lambda j: j["id"], 6, 0, justify="right"),
        Col("state", state, 9, 0),
        Col("user", lambda j: j.get("user") or "-", 8, 3),
        Col("script", label, 14, 0, flex=True),
        Col("tries", attempts, 5, 1, justify="right"),
        Col("took", lambda j: duration(job_duration(j, now)), 7, 1,
            justify="right"),
        Col("progress", lambda j: progress_bar(
            j.get("progress") if j["state"] == "running" else None), 15, 2),
        Col("worker", lambda j: j.get("worker") or "-", 10, 5),
        Col("submitted", lambda j: clock(j.get("submitted_at")), 9, 6),
        Col("error / message", note, 24, 7, flex=True),
    ]
    if not view.get("admin"):
        cols = [c for c in cols if c.header != "user"]
    return cols


def _usage_cols() -> list[Col]:
    return [
        Col("user", lambda u: u["user"], 8, 0, flex=True),
        Col("jobs", lambda u: u["jobs"], 5, 0, justify="right"),
        Col("tries", lambda u: u["attempts"], 5, 2, justify="right"),
        Col("cpu", lambda u: duration(u["cpu_seconds"]), 7, 1,
            justify="right"),
        Col("wall", lambda u: duration(u["wall_seconds"]), 7, 1,
            justify="right"),
    ]


def workers_table(view: dict, width: int) -> Table:
    """Every worker of ``view``, in ``width`` columns."""
    return table(_worker_cols(view), view["workers"], width,
                 row_style=_late_style(view))


def _late_style(view: dict) -> Callable[[dict], str]:
    liveness = view["liveness"]
    return lambda w: "bold" if liveness_style(w["liveness"], liveness) else ""


# The screen.

def header(view: dict, live: bool) -> Table:
    left = Text()
    left.append("msp monitor", style="bold")
    left.append(f"  broker {view['broker'] or '?'}")
    if view.get("user"):
        role = " (admin)" if view.get("admin") else ""
        left.append(f"  {printable(view['user'])}{role}")
    right = Text(clock(view["time"]))
    if live:
        right.append("  q quits")
    grid = Table.grid(expand=True)
    grid.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
    grid.add_column(no_wrap=True, justify="right")
    grid.add_row(left, right)
    return grid


def banner(view: dict) -> Text | None:
    problem = view.get("problem")
    if not problem:
        return None
    since = view.get("problem_seconds")
    text = problem if since is None else f"{problem} ({duration(since)})"
    style = "bold white on red" if not view["connected"] else "black on yellow"
    return Text(f" {text} ", style=style, no_wrap=True, overflow="ellipsis")


def summary(view: dict) -> list[Text]:
    jobs = Text(no_wrap=True, overflow="ellipsis")
    jobs.append("jobs  ", style="bold")
    for state, count in view["counts"].items():
        jobs.append(f"{state} ", style=STATE_STYLES.get(state, ""))
        jobs.append(f"{count}  ")
    queue = view["queue"]
    line = Text(no_wrap=True, overflow="ellipsis")
    line.append("queue ", style="bold")
    line.append(f"{queue['depth']} waiting")
    if len(queue["by_priority"]) > 1 or any(
        p != "0" for p in queue["by_priority"]
    ):
        parts = [f"p{p} {n}" for p, n in queue["by_priority"].items()]
        line.append(f" ({', '.join(parts)})")
    if queue["oldest_wait"] is not None:
        line.append(f", oldest {duration(queue['oldest_wait'])}")
    # The last minute is under way: show it beside the last whole one.
    per_minute = view["finished_per_minute"]
    last = per_minute[-2] if len(per_minute) > 1 else 0
    line.append("   done/min ", style="bold")
    line.append(sparkline(per_minute))
    line.append(f" {last}, {per_minute[-1]} now")
    return [jobs, line]


@dataclass
class Section:
    cols: list[Col]
    rows: list[dict]
    style: Callable[[dict], str] | None = None
    # Lines for rows; when short of the rows, the last says what is left.
    lines: int = 0

    def table(self, width: int) -> Table:
        rows, more = self.rows, 0
        if self.lines < len(rows):
            rows = rows[:max(self.lines - 1, 0)]
            more = len(self.rows) - len(rows)
        return table(self.cols, rows, width, more, self.style)


def share(demands: list[int], room: int) -> list[int]:
    """Split ``room`` lines among demands one line at a time in turn, so
    that a long list cannot starve a short one."""
    given = [0] * len(demands)
    while room > 0 and any(g < d for g, d in zip(given, demands, strict=True)):
        for i, d in enumerate(demands):
            if room and given[i] < d:
                given[i] += 1
                room -= 1
    return given


def render(view: dict, width: int, height: int | None = None
           ) -> RenderableType:
    """The monitor's screen for ``view``: ``width`` columns, at most
    ``height`` lines (None: printed once, as many as the lists need)."""
    top: list[RenderableType] = [header(view, live=height is not None)]
    line = banner(view)
    if line is not None:
        top.append(line)
    top += summary(view)

    workers = Section(_worker_cols(view), view["workers"], _late_style(view))
    jobs = Section(_job_cols(view), view["recent"])
    usage = None
    if view.get("usage_today") is not None:
        usage = Section(_usage_cols(), view["usage_today"])
    # A band is a blank line, a header line and rows, of one section or,
    # on a wide screen, two side by side.
    wide = width >= WIDE and usage is not None
    bands = [[workers, usage] if wide else [workers], [jobs]]
    if usage is not None and not wide:
        bands.append([usage])
    demands = [max(max(len(s.rows), 1) for s in band) for band in bands]

    gap = True
    if height is None:
        lines = demands
    else:
        del top[max(height, 0):]
        room = height - len(top)
        gap = room - 2 * len(bands) >= sum(demands)
        # Too short even for a line of rows each: the last bands go.
        while bands and room - (1 + gap) * len(bands) < len(bands):
            bands.pop()
            demands.pop()
        lines = share(demands, room - (1 + gap) * len(bands))
    for band, n in zip(bands, lines, strict=True):
        for s in band:
            s.lines = n

    parts = list(top)
    for band in bands:
        if gap:
            parts.append(Text(""))
        if len(band) == 1:
            parts.append(band[0].table(width))
            continue
        side, pad = min(60, width // 3), 3
        grid = Table.grid(expand=True, padding=(0, 0, 0, pad),
                          pad_edge=False)
        grid.add_column(ratio=1, no_wrap=True)
        # A fixed width counts the cell's padding.
        grid.add_column(width=side + pad, no_wrap=True)
        grid.add_row(band[0].table(width - side - 3), band[1].table(side))
        parts.append(grid)
    return Group(*parts)
