"""The one place that knows every file name in a queue and a job folder.

```
<queue>/jobs/<name>/
    spec.yaml  state.json  lease  cancel-requested  history.csv  events.jsonl  runner.log  claims/g<N>
    checkpoints/<id>/MANIFEST.json   checkpoints/.tmp-<id>-<rand>/
    tensorboard/train/events.out.tfevents.g<N>.runner   tensorboard/validation/...
    final/model.keras
<queue>/deleted/<name>-<time>-<tag>/     what `runner delete --keep-checkpoints` kept: checkpoints/, final/
```
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runner import defaults

TEMP_PREFIX = ".tmp-"
"""Names starting with this are work in progress: never read as committed, collected as garbage."""

MANIFEST_NAME = "MANIFEST.json"
"""Written last into a checkpoint directory; a directory without a valid one is not a checkpoint."""


def is_temp_name(name: str) -> bool:
    """Whether a directory entry is an uncommitted temporary (file or folder)."""
    return name.startswith(TEMP_PREFIX)


def temp_sibling(path: Path, label: str | None = None) -> Path:
    """A fresh temporary name beside ``path`` that readers ignore and only this process uses."""
    return path.with_name(f"{TEMP_PREFIX}{label or path.name}-{os.getpid()}-{secrets.token_hex(4)}")


@dataclass(frozen=True)
class JobPaths:
    """Paths inside one job's folder."""

    folder: Path

    @property
    def name(self) -> str:
        """The job's name, which is its folder's name."""
        return self.folder.name

    @property
    def spec(self) -> Path:
        """Frozen copy of the validated spec, never rewritten."""
        return self.folder / "spec.yaml"

    @property
    def code(self) -> Path:
        """What a job trained by the user's own code records in place of a spec (``runner.fit``)."""
        return self.folder / "code.json"

    @property
    def state(self) -> Path:
        """Status, generation, restarts, error and timestamps, replaced atomically."""
        return self.folder / "state.json"

    @property
    def lease(self) -> Path:
        """The SoftFileLease marker of the worker running the job."""
        return self.folder / "lease"

    @property
    def cancel_request(self) -> Path:
        """Present while a cancel waits for the running worker to see it."""
        return self.folder / "cancel-requested"

    @property
    def claims(self) -> Path:
        """One empty marker per claim generation, created exclusively and never removed."""
        return self.folder / "claims"

    def claim_marker(self, generation: int) -> Path:
        """The marker of claim ``generation``."""
        return self.claims / f"g{generation:06d}"

    @property
    def checkpoints(self) -> Path:
        """Folder of committed checkpoints, one directory each."""
        return self.folder / "checkpoints"

    def checkpoint(self, checkpoint_id: str) -> Path:
        """A committed checkpoint's directory."""
        return self.checkpoints / checkpoint_id

    def checkpoint_in_progress(self, checkpoint_id: str) -> Path:
        """A fresh temporary directory for a checkpoint being published."""
        return temp_sibling(self.checkpoint(checkpoint_id))

    @property
    def history(self) -> Path:
        """One row per completed epoch, derived from the checkpoint."""
        return self.folder / "history.csv"

    @property
    def events(self) -> Path:
        """Append-only JSON lines: what happened to the job, in order."""
        return self.folder / "events.jsonl"

    @property
    def log(self) -> Path:
        """Human-readable log of every session that ran the job, tracebacks included."""
        return self.folder / "runner.log"

    @property
    def final(self) -> Path:
        """Exported models of a finished job."""
        return self.folder / "final"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard logs: a run folder each for training and validation, as Keras' TensorBoard callback has them."""
        return self.folder / "tensorboard"

    @property
    def tensorboard_train(self) -> Path:
        """The ``train`` run: each epoch's training metrics."""
        return self.tensorboard / "train"

    @property
    def tensorboard_validation(self) -> Path:
        """The ``validation`` run: each epoch's validation metrics, without the ``val_`` prefix."""
        return self.tensorboard / "validation"


EVENT_FILE_PREFIX = "events.out.tfevents.g"
EVENT_FILE_SUFFIX = ".runner"


def event_file_name(generation: int) -> str:
    """The TensorBoard event file of claim ``generation``.

    TensorBoard reads the files whose name holds ``tfevents``, in name order, and never goes back to an earlier
    name: the generation leads (zero padded) so a resumed run's file sorts after the ones it replaces, whatever
    the clocks of the machines that wrote them.
    """
    return f"{EVENT_FILE_PREFIX}{generation:06d}{EVENT_FILE_SUFFIX}"


def event_file_generation(name: str) -> int | None:
    """The claim generation of a runner event file's name; ``None`` for any other name (ours to leave alone)."""
    if not (name.startswith(EVENT_FILE_PREFIX) and name.endswith(EVENT_FILE_SUFFIX)):
        return None
    digits = name[len(EVENT_FILE_PREFIX) : -len(EVENT_FILE_SUFFIX)]
    return int(digits) if digits.isdigit() else None


@dataclass(frozen=True)
class QueuePaths:
    """Paths of a queue: a folder holding job folders."""

    root: Path

    @property
    def jobs(self) -> Path:
        """Folder holding one folder per job."""
        return self.root / "jobs"

    def job(self, name: str) -> JobPaths:
        """The folder of the job called ``name``."""
        return JobPaths(self.jobs / name)

    def deleted(self, name: str, when: float) -> Path:
        """Where ``runner delete --keep-checkpoints`` keeps a job's checkpoints and exports."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(when))
        return self.root / "deleted" / f"{name}-{stamp}-{secrets.token_hex(2)}"

    def job_in_progress(self, name: str) -> Path:
        """A temporary folder in which a submitted job is assembled before it appears."""
        return temp_sibling(self.jobs / name)


def on_colab(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process runs in a Google Colab runtime: Colab sets ``COLAB_RELEASE_TAG`` and ships
    ``google.colab`` (looked up, not imported: importing it outside a kernel has side effects)."""
    if environ.get("COLAB_RELEASE_TAG"):
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):
        return False


def default_queue_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The queue folder when none is given: ``$RUNNER_QUEUE``, then Drive on Colab, then ``./runner-queue``."""
    return queue_choice(None, environ)[0]


def queue_choice(given: str | Path | None, environ: Mapping[str, str] = os.environ) -> tuple[Path, str]:
    """The queue folder, and how it was chosen, in words for a message: given, ``$RUNNER_QUEUE``, Colab's default
    or the default in the current folder."""
    if given is not None:
        return Path(given).expanduser(), "as given"
    if value := environ.get(defaults.QUEUE_ENV):
        return Path(value).expanduser(), f"from ${defaults.QUEUE_ENV}"
    if on_colab(environ):
        return Path(defaults.QUEUE_DIR_COLAB), "Colab's default"
    return Path(defaults.QUEUE_DIR_LOCAL), f"the default: ./{defaults.QUEUE_DIR_LOCAL} in the current folder"


def on_drive(path: Path) -> bool:
    """Whether ``path`` is on Colab's Google Drive mount."""
    return Path(path).absolute().is_relative_to(defaults.DRIVE_MOUNT_POINT)


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The local cache folder: ``$RUNNER_CACHE``, then the VM's disk on Colab, then the user's cache folder."""
    if value := environ.get(defaults.CACHE_ENV):
        return Path(value).expanduser()
    if on_colab(environ):
        return Path(defaults.CACHE_DIR_COLAB)
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "runner"


def publish_note(cache_dir: Path, job: str) -> Path:
    """On local disk: present while a job's newest checkpoint waits there because the job folder is failing."""
    return cache_dir / "publishing" / f"{job}.json"


@dataclass(frozen=True)
class KeptSnapshotPaths:
    """On local disk: a job's newest snapshot that could not be published, until a next claim here publishes it.

    ``<cache>/kept/<job>-<key>/``: ``files/`` (the snapshot) and ``kept.json`` (whose claim trained it, and how
    far), written last. The key is a hash of the job folder's path, so two queues' jobs of one name never share.
    """

    folder: Path

    @classmethod
    def of(cls, cache_dir: Path, job_folder: Path) -> KeptSnapshotPaths:
        key = hashlib.sha256(str(Path(job_folder).absolute()).encode()).hexdigest()[:12]
        return cls(cache_dir / "kept" / f"{Path(job_folder).name}-{key}")

    @property
    def files(self) -> Path:
        return self.folder / "files"

    @property
    def note(self) -> Path:
        return self.folder / "kept.json"

    @property
    def in_progress(self) -> Path:
        """Where the next kept snapshot is assembled before it replaces this one."""
        return self.folder.with_name(f".tmp-{self.folder.name}")


def work_folder(cache_dir: Path, job: str, generation: int) -> Path:
    """On local disk: one claim's scratch space (restored checkpoint, snapshots, exports)."""
    return cache_dir / "work" / f"{job}-g{generation}"


@dataclass(frozen=True)
class DatasetCachePaths:
    """One dataset source's folder in the local cache: ``<cache>/datasets/<key>/``."""

    folder: Path

    @classmethod
    def of(cls, cache_dir: Path, key: str) -> DatasetCachePaths:
        """The folder of the source whose key is ``key``."""
        return cls(cache_dir / "datasets" / key)

    @property
    def lock(self) -> Path:
        """Held while the entry is checked or filled, so two workers on one machine do not fill it together."""
        return self.folder.with_name(f"{self.folder.name}.lock")

    @property
    def archive(self) -> Path:
        """A downloaded or copied archive, kept until its tree is committed (a kill then needs no new download)."""
        return self.folder / "archive"

    @property
    def data(self) -> Path:
        """The dataset's tree, committed by a rename."""
        return self.folder / "data"

    @property
    def marker(self) -> Path:
        """Written last: the tree is complete, and from the source its stamp describes."""
        return self.folder / "READY.json"
