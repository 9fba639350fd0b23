"""A job's claims rebuilt from its events.jsonl, and the rules that no two of them may break together.

Each claim generation's interval runs from its ``claimed`` event to its last event that carries its generation
(checkpoint, interrupted, done, failed). A killed worker's interval ends at its last event: what it did after
that left no trace, so it cannot have overlapped anything that matters. ``resumed`` and ``fallback`` events carry
no generation; they belong to the claim before them in the file (claims never overlap, which is checked).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from runner.checkpoints import parse_checkpoint_id

TIME_SLACK_S = 0.002
"""Event times are rounded to the millisecond by EventLog."""


@dataclass
class Generation:
    """One claim of a job, as its events tell it."""

    generation: int
    claimed_at: float | None = None
    worker: str | None = None
    resumed: bool | None = None
    previous: str | None = None
    index: int = -1
    """Position of the claimed event in events.jsonl."""
    events: list[dict[str, Any]] = field(default_factory=list)
    last_index: int = -1
    resumed_from: str | None = None

    @property
    def last_at(self) -> float:
        """Time of its last event."""
        return max(event["time"] for event in self.events)

    def kinds(self) -> list[str]:
        """Its events' names, in order."""
        return [event["event"] for event in self.events]


def generations(events: list[dict[str, Any]]) -> dict[int, Generation]:
    """Each generation's claim and events (keyed by generation)."""
    found: dict[int, Generation] = {}
    current: Generation | None = None
    for index, event in enumerate(events):
        if event["event"] == "claimed":
            current = found.setdefault(event["generation"], Generation(event["generation"]))
            current.claimed_at, current.worker, current.index = event["time"], event.get("worker"), index
            current.resumed, current.previous = event.get("resumed"), event.get("previous")
        if "generation" in event and event["event"] != "cancelled":
            entry = found.setdefault(event["generation"], Generation(event["generation"]))
            entry.events.append(event)
            entry.last_index = max(entry.last_index, index)
        elif event["event"] == "resumed" and current is not None:
            current.resumed_from = event["checkpoint"]
    return found


def timeline_problems(events: list[dict[str, Any]]) -> list[str]:
    """Every way the job's events show two claims at once, a claim out of order, or an event of no claim."""
    problems: list[str] = []
    claims = [event for event in events if event["event"] == "claimed"]
    numbers = [event["generation"] for event in claims]
    if numbers != sorted(set(numbers)):
        problems.append(f"claim generations do not strictly increase in events.jsonl: {numbers}")
    times = [event["time"] for event in claims]
    if times != sorted(times):
        problems.append(f"claim times go backwards: {list(zip(numbers, times))}")
    by_generation = generations(events)
    for number, entry in sorted(by_generation.items()):
        if entry.claimed_at is None:
            problems.append(f"generation {number} has events {entry.kinds()} but never claimed the job")
    ordered = [entry for _, entry in sorted(by_generation.items()) if entry.claimed_at is not None]
    for earlier, later in itertools.pairwise(ordered):
        assert later.claimed_at is not None
        if later.claimed_at + TIME_SLACK_S < earlier.last_at:
            problems.append(
                f"generation {later.generation} ({later.worker}) claimed at {later.claimed_at:.3f}, before "
                f"generation {earlier.generation} ({earlier.worker}) wrote its last event at {earlier.last_at:.3f} "
                f"({earlier.kinds()[-1]}): two workers trained the job at the same time"
            )
        if later.index < earlier.last_index:
            problems.append(
                f"generation {earlier.generation} wrote {events[earlier.last_index]['event']!r} after generation "
                f"{later.generation} had claimed the job (events.jsonl order)"
            )
    for event in events:
        if event["event"] == "checkpoint":
            parsed = parse_checkpoint_id(event["checkpoint"])
            if parsed is None or parsed[0] != event["generation"]:
                problems.append(f"checkpoint event {event} names another generation than its own")
    return problems


def late_commits(events: list[dict[str, Any]], manifests: list[dict[str, Any]]) -> list[str]:
    """Committed checkpoints (by manifest) of a generation that a newer claim had already superseded."""
    claims: dict[int, float] = {}
    for event in events:
        if event["event"] == "claimed":  # the first claim of a generation (a generation claimed twice is a bug too)
            claims[event["generation"]] = min(event["time"], claims.get(event["generation"], event["time"]))
    problems = []
    for manifest in manifests:
        created, own = manifest["created_at"], manifest["generation"]
        for number, claimed_at in claims.items():
            if number > own and claimed_at + TIME_SLACK_S < created:
                problems.append(
                    f"checkpoint {manifest['id']} of generation {own} was created at {created:.3f}, after "
                    f"generation {number} had claimed the job at {claimed_at:.3f}, and yet it was committed"
                )
    return problems
