"""What compute costs: the price plan applied to an attempt's usage.

The broker prices each attempt when it records its result and stores the
cost with it, so a later change of plan never rewrites what was billed.

An attempt costs::

    per_cpu_second x (user + system CPU seconds)
  + per_wall_second x wall seconds
  + per_gb_hour x peak memory (GiB) x wall hours
  + per_job, on the attempt that ends its job

A lost attempt (its worker died) costs nothing. A failed, timed-out or
unstartable one costs as above when ``charge_failed`` is true, else
nothing. A cancelled one is charged: it used what it used at its owner's
request.
"""

from __future__ import annotations

from datetime import datetime

from .config import BillingConfig

FAILED_OUTCOMES = frozenset(("failed", "timed_out", "error"))
KIB_PER_GIB = 1024 * 1024


def charged(plan: BillingConfig, outcome: str) -> bool:
    if outcome == "lost":
        return False
    return plan.charge_failed or outcome not in FAILED_OUTCOMES


def cost(plan: BillingConfig, outcome: str, usage: dict,
         final: bool) -> float:
    """The cost of one attempt with ``usage`` (the keys of a RESULT's
    usage: wall, user, system seconds, max_rss_kb)."""
    if not charged(plan, outcome):
        return 0.0
    wall = usage.get("wall") or 0.0
    cpu = (usage.get("user") or 0.0) + (usage.get("system") or 0.0)
    gib = (usage.get("max_rss_kb") or 0) / KIB_PER_GIB
    amount = (
        plan.per_cpu_second * cpu
        + plan.per_wall_second * wall
        + plan.per_gb_hour * gib * wall / 3600.0
    )
    if final:
        amount += plan.per_job
    return amount


# XXX: an attempt stores its cost but not the currency: a plan that changes
# currency makes older costs read in the new one.


def month_start(wall: float) -> float:
    """The start of the calendar month holding ``wall``, local time."""
    now = datetime.fromtimestamp(wall).astimezone()
    return now.replace(day=1, hour=0, minute=0, second=0,
                       microsecond=0).timestamp()


def statement(rows: list[dict]) -> tuple[list[dict], dict]:
    """Per-job lines and totals from the attempt rows of Store.usage."""
    jobs: dict[int, dict] = {}
    for r in rows:
        line = jobs.get(r["job"])
        if line is None:
            line = jobs[r["job"]] = {
                "job": r["job"], "user": r["user"], "name": r["name"],
                "script": r["script"], "attempts": 0, "outcomes": [],
                "cpu_seconds": 0.0, "wall_seconds": 0.0, "peak_mb": 0.0,
                "cost": 0.0, "first_started": r["started_at"],
                "last_ended": r["ended_at"],
            }
        line["attempts"] += 1
        line["outcomes"].append(r["outcome"])
        line["cpu_seconds"] += (r["cpu_user"] or 0.0) + (r["cpu_system"] or 0.0)
        line["wall_seconds"] += r["wall_seconds"] or 0.0
        line["peak_mb"] = max(line["peak_mb"], (r["max_rss_kb"] or 0) / 1024)
        line["cost"] += r["cost"] or 0.0
        line["last_ended"] = max(line["last_ended"], r["ended_at"])
    lines = sorted(jobs.values(), key=lambda line: line["job"])
    totals = {
        "jobs": len(lines),
        "attempts": sum(line["attempts"] for line in lines),
        "cpu_seconds": sum(line["cpu_seconds"] for line in lines),
        "wall_seconds": sum(line["wall_seconds"] for line in lines),
        "peak_mb": max((line["peak_mb"] for line in lines), default=0.0),
        "cost": sum(line["cost"] for line in lines),
    }
    return lines, totals
