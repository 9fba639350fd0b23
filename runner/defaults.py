"""Named defaults, each with the reason for its value."""

from __future__ import annotations

LEASE_DURATION_S = 90.0
"""Seconds a silent lease must stay unchanged before another worker takes the job.

Long enough to ride out a slow Drive refresh (heartbeats come every third of it), short enough that a new
Colab session does not wait long for the job of a session that died. Every worker of a queue must agree on it.
"""

CLAIM_SETTLE_MAX_S = 15.0
"""The longest a claim waits for a released job's last state write to arrive (see ``Queue.claim``): on Drive a
write reaches other VMs seconds late, and not always in the order it was made."""

LEASE_DURATION_DRIVE_S = 300.0
""":data:`LEASE_DURATION_S` for a queue on Google Drive (under ``/content/drive``).

Drive shows one VM's changes to another minutes later, and not as a steady stream: a live worker's heartbeats can
reach a second VM in bursts. A second VM takes a job over only after seeing its marker unchanged this long, so
the lease must outlast the longest stall of that stream (heartbeats come every third of it: stalls up to about 200 s
are ridden out). The price: a new VM waits up to 5 minutes for the job of a VM that died (a restarted session on
the same VM takes over at once). Measured with two simulated VMs in docs/reliability.md.
"""

RETRY_BUDGET_S = 300.0
"""Seconds one file operation keeps retrying transient errors (errno 107, EIO, timeouts) before giving up."""

RETRY_BUDGET_ENV = "RUNNER_RETRY_BUDGET"
"""Environment variable overriding :data:`RETRY_BUDGET_S` (seconds), e.g. to test long outages quickly."""

RETRY_MAX_ATTEMPTS = 80
"""Tries of one file operation before giving up, whatever the clock says. With random pauses growing to 10 s,
the 300 s budget is what ends a long outage (about 60 tries); this bounds retries under a fake sleep."""

RETRY_MAX_WAIT_S = 10.0
"""Longest pause between two tries of one file operation (exponential backoff with jitter up to this). Each try
that fails says so in a line: a person waiting sees one at least every 10 s, never minutes of silence."""

UNREACHABLE_RETRY_BUDGET_S = 10.0
"""Seconds a download keeps retrying a host that refuses the connection or a name that does not resolve for
now: a wrong or offline address is said in seconds, not after the whole retry budget."""

CHECKPOINT_KEEP = 2
"""Committed checkpoints kept per job: the newest plus one to fall back to if the newest is damaged."""

STATUS_WATCH_INTERVAL_S = 2.0
"""Seconds between refreshes of ``runner status --watch``."""

QUEUE_DIR_LOCAL = "runner-queue"
"""Queue folder, relative to the working directory, when neither ``--queue`` nor ``$RUNNER_QUEUE`` is given."""

DRIVE_MOUNT_POINT = "/content/drive"
"""Where Colab mounts Google Drive (the tutorial's path, and the one Colab's file browser uses)."""

QUEUE_DIR_COLAB = f"{DRIVE_MOUNT_POINT}/MyDrive/runner"
"""Queue folder on Colab: on the mounted Drive, so that it outlives the session."""

EXIT_TIME_LIMIT = 75
"""``runner work`` stopped at ``--max-hours`` with work left: run it again in a new session (EX_TEMPFAIL)."""

QUEUE_ENV = "RUNNER_QUEUE"
"""Environment variable naming the queue folder."""

LEASE_DURATION_ENV = "RUNNER_LEASE_DURATION"
"""Environment variable overriding :data:`LEASE_DURATION_S` (seconds), and :data:`LEASE_DURATION_DRIVE_S` (seconds)
for a queue on Drive."""

TRAINER_ENV = "RUNNER_TRAINER"
"""Environment variable naming the trainer factory as ``package.module:attribute``."""

TRAINER_DEFAULT = "runner.train:KerasTrainer"
"""The trainer ``runner work`` uses unless :data:`TRAINER_ENV` names another."""

SIGNAL_STOP_GRACE_S = 60.0
"""Seconds a worker waits, after SIGTERM or SIGINT, for the trainer to save and stop before it gives up the job."""

CANCEL_POLL_S = 5.0
"""Seconds between two looks for a cancel request while training (a stat on Drive is not free)."""

CACHE_ENV = "RUNNER_CACHE"
"""Environment variable naming the local cache folder (datasets, local checkpoint snapshots)."""

CACHE_DIR_COLAB = "/content/runner-cache"
"""Local cache on Colab: the VM's own disk, fast, and gone with the session (which is fine for a cache)."""

PUBLISH_RETRY_PAUSE_S = 15.0
"""Seconds before publishing a checkpoint again after the job folder's storage failed past its retries."""

PUBLISH_FLUSH_TIMEOUT_S = 600.0
"""Seconds a stopping or finishing trainer waits for its last checkpoint to reach the job folder; past it, the
checkpoint is kept on local disk and the job left resumable (the next ``runner work`` on that machine publishes it)."""

FLUSH_TIMEOUT_ENV = "RUNNER_FLUSH_TIMEOUT"
"""Environment variable overriding :data:`PUBLISH_FLUSH_TIMEOUT_S` (seconds)."""

STATUS_RETRY_BUDGET_S = 10.0
"""Seconds `runner status` keeps retrying a failing job folder before it says so."""
