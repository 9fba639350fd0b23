"""Rebuilding a job's state.json when it is damaged, from what the job folder still knows.

state.json is only ever replaced atomically, so damage comes from outside: a sync conflict on Drive, a user's
editor, a disk error. Everything in it can be derived again: the lifecycle from events.jsonl (append-only), the
progress from the committed checkpoints' names. Only the holder of the job's lease may do this.
"""

from __future__ import annotations

from runner.checkpoints import CheckpointStore
from runner.errors import DamagedFile
from runner.job import Job, JobState, JobStatus

_TERMINAL_EVENTS = {
    "done": JobStatus.DONE,
    "failed": JobStatus.FAILED,
    "cancelled": JobStatus.CANCELLED,
    "retried": JobStatus.QUEUED,
    "claimed": JobStatus.RUNNING,
    "replaced": JobStatus.QUEUED,
}
"""Events that set the status, by the status they leave the job in."""


def rebuild_state(job: Job) -> JobState:
    """The state implied by the job's events and committed checkpoints."""
    events = job.events.read()
    now = job.clock()
    submitted = next((event["time"] for event in events if event.get("event") == "submitted"), now)
    status, error = JobStatus.QUEUED, None
    for event in events:
        if event.get("event") in _TERMINAL_EVENTS:
            status = _TERMINAL_EVENTS[event["event"]]
            error = event.get("error") if status is JobStatus.FAILED else None
    replaced = [event for event in events if event.get("event") == "replaced" and event.get("discarded_because")]
    fresh_from = max((int(event.get("generation") or 0) for event in replaced), default=0)
    committed = [info for info in CheckpointStore(job, keep=1).committed() if info.generation >= fresh_from]
    generations = [int(event.get("generation") or 0) for event in events] + [info.generation for info in committed]
    claims = sum(1 for event in events if event.get("event") == "claimed")
    newest = committed[0] if committed else None
    return JobState(
        status=status,
        generation=max([*generations, job.newest_claim_marker()], default=0),
        restarts=max(0, claims - 1),
        submitted_at=submitted,
        updated_at=now,
        error=error,
        epoch=newest.epoch if newest else 0,
        step=newest.step if newest else 0,
        checkpoint=newest.id if newest else None,
        fresh_from=fresh_from,
    )


def repair_damaged_state(job: Job) -> JobState | None:
    """With the job's lease held: if state.json is damaged, rebuild and write it, log it; else ``None``."""
    try:
        job.read_state()
        return None
    except DamagedFile as damage:
        reason = damage.reason
    state = rebuild_state(job)
    job.write_state(state, generation=None)
    job.events.append(
        "state-recovered",
        reason=reason,
        status=state.status.value,
        generation=state.generation,
        checkpoint=state.checkpoint,
    )
    return state
