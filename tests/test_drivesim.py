"""The Drive simulator's own contract, on a real FUSE mount served by a real process.

Timing bounds appear only where the simulator promises a delay (latency, bandwidth, durability lag), and only as
loose lower bounds; everything else is checked by content and counters.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runner import storage
from tests.conftest import REPO
from tests.drivesim import DriveSim, FaultPlan
from tests.drivesim.fixtures import SimFactory, requires_fuse
from tests.drivesim.mounts import is_mounted

pytestmark = requires_fuse

MakeSim = Callable[..., DriveSim]


@pytest.fixture
def drive_sim(tmp_path: Path) -> Iterator[SimFactory]:
    """Mounts simulators in ``tmp_path``; every one is unmounted (or killed and detached) at teardown."""
    with SimFactory(tmp_path) as factory:
        yield factory


def _errno_of(action: Callable[[], object]) -> int | None:
    try:
        action()
    except OSError as error:
        return error.errno
    return None


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _total(counts: dict[str, dict[str, int]], op: str) -> int:
    return sum(counts.get(op, {}).values())


# -- mounting ---------------------------------------------------------------------------------------------------


def test_unmount_and_vm_death_leave_no_stale_mount_or_process(drive_sim: MakeSim, tmp_path: Path) -> None:
    sim = drive_sim()
    mountpoint, server = sim.mountpoint, sim.pid
    assert os.path.ismount(mountpoint) and server is not None
    sim.unmount()
    assert not is_mounted(mountpoint)
    with pytest.raises(ProcessLookupError):
        os.kill(server, 0)

    again = drive_sim(mountpoint=mountpoint, durability_lag_s=30.0)
    (mountpoint / "open-while-dying.txt").write_text("x")
    held = open(mountpoint / "open-while-dying.txt")  # noqa: SIM115  (a worker still holding a file when the VM goes)
    again.vm_dies()
    assert _errno_of(held.close) == errno.ENOTCONN  # what a survivor of the VM would see
    assert not is_mounted(mountpoint)
    assert drive_sim(mountpoint=mountpoint).mounted  # the same mount point is reusable at once


@pytest.mark.slow
def test_a_killed_test_process_takes_its_mount_down(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    owner = subprocess.Popen(
        [sys.executable, "-c", (
            "import time; from tests.drivesim import DriveSim; "
            f"DriveSim({str(tmp_path / 'drive')!r}, {str(mountpoint)!r}).mount(); "
            "print('up', flush=True); time.sleep(600)"
        )],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "up"
        assert is_mounted(mountpoint)
    finally:
        owner.send_signal(signal.SIGKILL)  # no atexit, no finalizer: only the server's own watchdog is left
        owner.wait()
    assert _wait_for(lambda: not is_mounted(mountpoint), timeout=15.0), "the orphaned mount stayed"


# -- passthrough ------------------------------------------------------------------------------------------------


def test_passthrough_keeps_bytes_and_names(drive_sim: MakeSim) -> None:
    sim = drive_sim()
    mnt, remote = sim.mountpoint, sim.remote
    data = random.Random(1).randbytes(777_777)
    (mnt / "jobs" / "a").mkdir(parents=True)
    (mnt / "jobs" / "a" / "weights.h5").write_bytes(data)
    assert (remote / "jobs" / "a" / "weights.h5").read_bytes() == data
    assert (mnt / "jobs" / "a" / "weights.h5").read_bytes() == data

    with open(mnt / "jobs" / "a" / "events.jsonl", "a") as log:
        log.write("one\n")
    with open(mnt / "jobs" / "a" / "events.jsonl", "a") as log:
        log.write("two\n")
    os.replace(mnt / "jobs" / "a" / "weights.h5", mnt / "jobs" / "a" / "final.h5")
    os.truncate(mnt / "jobs" / "a" / "final.h5", 10)
    os.link(mnt / "jobs" / "a" / "final.h5", mnt / "jobs" / "a" / "hard")
    os.symlink("final.h5", mnt / "jobs" / "a" / "soft")
    os.chmod(mnt / "jobs" / "a" / "final.h5", 0o600)
    os.utime(mnt / "jobs" / "a" / "final.h5", ns=(1_000_000_000, 2_000_000_000))

    a = remote / "jobs" / "a"
    assert (a / "events.jsonl").read_text() == "one\ntwo\n"
    names = ["events.jsonl", "final.h5", "hard", "soft"]
    assert sorted(os.listdir(a)) == sorted(os.listdir(mnt / "jobs" / "a")) == names
    assert (a / "final.h5").read_bytes() == data[:10] == (mnt / "jobs" / "a" / "soft").read_bytes()
    assert (a / "final.h5").stat().st_mode & 0o777 == 0o600
    assert (a / "final.h5").stat().st_mtime_ns == 2_000_000_000
    for name in os.listdir(a):
        os.unlink(mnt / "jobs" / "a" / name)
    os.rmdir(mnt / "jobs" / "a")
    assert os.listdir(remote / "jobs") == []


# -- link -------------------------------------------------------------------------------------------------------


def test_latency_is_paid_by_every_metadata_operation(drive_sim: MakeSim) -> None:
    sim = drive_sim(latency_s=0.05)
    start = time.monotonic()
    for i in range(20):
        assert not os.path.exists(sim.mountpoint / f"missing-{i}")  # one lookup each, never cached
    assert time.monotonic() - start >= 20 * 0.05 * 0.8
    assert sim.stats()["calls"]["getattr"] >= 20


@pytest.mark.slow
def test_bandwidth_caps_writes_and_reads(drive_sim: MakeSim) -> None:
    sim = drive_sim(bandwidth_bps=1_000_000)
    data = os.urandom(2_000_000)
    start = time.monotonic()
    (sim.mountpoint / "big.bin").write_bytes(data)
    assert time.monotonic() - start >= 1.5  # 2 MB at 1 MB/s
    sim.set_link(bandwidth_bps=2_000_000)
    start = time.monotonic()
    assert (sim.mountpoint / "big.bin").read_bytes() == data  # opening again drops the kernel's page cache
    assert time.monotonic() - start >= 0.7  # 2 MB at 2 MB/s


# -- faults -----------------------------------------------------------------------------------------------------


def test_faults_hit_only_the_chosen_ops_at_about_the_rate(drive_sim: MakeSim) -> None:
    sim = drive_sim(faults=FaultPlan(rate=0.25, ops=("open", "mkdir"), seed=7))
    (sim.remote / "data.bin").write_bytes(b"payload")
    seen: Counter[int | None] = Counter()
    for _ in range(200):
        seen[_errno_of((sim.mountpoint / "data.bin").read_bytes)] += 1
    for i in range(100):
        seen[_errno_of(functools.partial(os.mkdir, sim.mountpoint / f"d{i}"))] += 1

    assert set(seen) == {None, errno.EIO, errno.ENOTCONN}
    injected = seen[errno.EIO] + seen[errno.ENOTCONN]
    assert 30 <= injected <= 130  # 300 tries at 25 %
    faults = sim.stats()["faults"]
    assert set(faults) == {"open", "mkdir"}
    assert _total(faults, "open") + _total(faults, "mkdir") == injected  # each fault reached the caller once
    assert sum(faults[op].get("EIO", 0) for op in faults) == seen[errno.EIO]

    # Operations not in the plan never fail: stat, create, write, rename, unlink, listdir.
    for i in range(50):
        (sim.mountpoint / f"new-{i}").write_bytes(b"x" * 1000)
        os.stat(sim.mountpoint / f"new-{i}")
        os.rename(sim.mountpoint / f"new-{i}", sim.mountpoint / f"renamed-{i}")
    assert len([n for n in os.listdir(sim.mountpoint) if n.startswith("renamed-")]) == 50
    for i in range(50):
        os.unlink(sim.mountpoint / f"renamed-{i}")

    sim.set_faults(rate=0.0)
    assert all((sim.mountpoint / "data.bin").read_bytes() == b"payload" for _ in range(50))


def test_an_ambiguous_fault_reports_failure_after_the_change_was_made(drive_sim: MakeSim) -> None:
    sim = drive_sim(faults=FaultPlan(rate=1.0, errnos=(errno.EIO,), ops=("rename",), after=1.0))
    (sim.mountpoint / "a").write_text("x")
    assert _errno_of(lambda: os.rename(sim.mountpoint / "a", sim.mountpoint / "b")) == errno.EIO
    assert os.listdir(sim.remote) == ["b"]


def test_an_outage_fails_every_operation_with_enotconn_then_recovers(drive_sim: MakeSim) -> None:
    sim = drive_sim(cache_s=0.0)  # no kernel cache: every call reaches the mount
    mnt = sim.mountpoint
    (mnt / "f").write_text("x")
    sim.outage(1.0)
    actions: list[Callable[[], object]] = [
        lambda: os.stat(mnt / "f"),
        lambda: os.listdir(mnt),
        lambda: (mnt / "g").write_text("y"),
        lambda: os.mkdir(mnt / "d"),
    ]
    assert [_errno_of(action) for action in actions] == [errno.ENOTCONN] * len(actions)
    assert _wait_for(lambda: _errno_of(lambda: os.listdir(mnt)) is None)
    assert [_errno_of(action) for action in actions] == [None] * len(actions)
    assert sum(sim.stats()["outage"].values()) >= len(actions)


def test_atomic_write_json_rides_out_eio_on_fsync_and_rename(
    drive_sim: MakeSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = drive_sim(faults=FaultPlan(rate=0.2, errnos=(errno.EIO,), ops=("fsync", "rename"), seed=3))
    sleeps: list[float] = []
    # The real policy, with its sleep recorded instead of slept.
    unretried = storage.atomic_write_bytes.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.setattr(storage, "atomic_write_bytes", storage.retrying(sleep=sleeps.append)(unretried))
    for i in range(30):
        storage.atomic_write_json(sim.mountpoint / "state.json", {"i": i})
    assert storage.read_json(sim.remote / "state.json") == {"i": 29}
    assert os.listdir(sim.remote) == ["state.json"]  # every failed try cleaned up its temporary file
    faults = sim.stats()["faults"]
    injected = _total(faults, "fsync") + _total(faults, "rename")
    assert injected > 0 and len(sleeps) == injected  # each fault cost exactly one retry


# -- write-back -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_write_back_makes_a_closed_file_durable_only_after_the_lag(drive_sim: MakeSim) -> None:
    sim = drive_sim(durability_lag_s=1.5)
    data = os.urandom(300_000)
    (sim.mountpoint / "ckpt").mkdir()
    (sim.mountpoint / "ckpt" / "weights.bin").write_bytes(data)
    assert (sim.mountpoint / "ckpt" / "weights.bin").read_bytes() == data  # the VM sees it at once
    assert not (sim.remote / "ckpt").exists() and sim.pending() == 2  # mkdir, content
    assert _wait_for(lambda: (sim.remote / "ckpt" / "weights.bin").exists())
    assert (sim.remote / "ckpt" / "weights.bin").read_bytes() == data
    assert sim.pending() == 0


def test_vm_death_loses_exactly_what_was_not_durable(drive_sim: MakeSim, tmp_path: Path) -> None:
    remote = tmp_path / "drive"
    remote.mkdir()
    (remote / "state.json").write_text("old")
    sim = drive_sim(remote, durability_lag_s=60.0)
    (sim.mountpoint / "durable.txt").write_text("kept")
    assert sim.sync_now() == 1
    (sim.mountpoint / "lost.txt").write_text("lost")
    (sim.mountpoint / "state.json").write_text("new")
    os.unlink(sim.mountpoint / "durable.txt")
    worker = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nwhile True:\n    open(sys.argv[1], 'a').write('x')\n    time.sleep(0.01)",
         str(sim.mountpoint / "worker.log")],
        start_new_session=True,
    )  # fmt: skip
    assert _wait_for(lambda: (sim.mountpoint / "worker.log").exists())
    sim.vm_dies(workers=[worker])

    assert worker.returncode == -signal.SIGKILL
    assert os.listdir(sim.mountpoint) == []  # the bare folder: the dead VM's processes wrote nothing into it

    assert sorted(os.listdir(remote)) == ["durable.txt", "state.json"]
    assert (remote / "state.json").read_text() == "old"
    next_vm = drive_sim(remote, durability_lag_s=60.0)
    assert sorted(os.listdir(next_vm.mountpoint)) == ["durable.txt", "state.json"]
    assert (next_vm.mountpoint / "state.json").read_text() == "old"


def test_a_rename_never_becomes_durable_ahead_of_the_content_it_names(drive_sim: MakeSim, tmp_path: Path) -> None:
    remote = tmp_path / "drive"
    remote.mkdir()
    (remote / "MANIFEST.json").write_text("v1")
    sim = drive_sim(remote, durability_lag_s=60.0)
    mnt = sim.mountpoint
    with open(mnt / ".tmp-manifest", "w") as handle:  # the atomic-write pattern: write, fsync, close, rename
        handle.write("v2")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(mnt / ".tmp-manifest", mnt / "MANIFEST.json")
    assert sim.pending() == 2  # content of the temporary file, then the rename
    assert sim.sync_now(1) == 1  # the upload got as far as the content...
    assert (remote / ".tmp-manifest").read_text() == "v2" and (remote / "MANIFEST.json").read_text() == "v1"

    # A file renamed while still open: what was written before the rename goes ahead of it in the journal.
    with open(mnt / "growing", "w") as handle:
        handle.write("A")
        handle.flush()
        os.rename(mnt / "growing", mnt / "grown")
        handle.write("B")
    assert sim.pending() == 4  # rename of the manifest, content "A" of growing, rename, content "AB" of grown
    assert sim.sync_now(3) == 3
    sim.vm_dies()  # ...and the VM died before the rest

    assert (remote / "MANIFEST.json").read_text() == "v2" and not (remote / ".tmp-manifest").exists()
    assert (remote / "grown").read_text() == "A" and not (remote / "growing").exists()
    next_vm = drive_sim(remote, durability_lag_s=60.0)
    assert (next_vm.mountpoint / "grown").read_text() == "A"


def test_a_clean_unmount_uploads_what_is_pending(drive_sim: MakeSim) -> None:
    sim = drive_sim(durability_lag_s=60.0)
    (sim.mountpoint / "a.txt").write_text("a")
    sim.unmount()
    assert (sim.remote / "a.txt").read_text() == "a"


def test_fault_plans_are_checked_up_front() -> None:
    with pytest.raises(ValueError, match="rate"):
        FaultPlan(rate=1.5)
    with pytest.raises(ValueError, match="unknown ops"):
        FaultPlan(ops=("wirte",))
    with pytest.raises(ValueError, match="unknown errnos"):
        FaultPlan(errnos=(99999,))
    single = FaultPlan(ops="fsync")  # type: ignore[arg-type]  # one op name alone is accepted too
    assert single.ops == ("fsync",)
    assert FaultPlan.from_dict(FaultPlan(rate=0.5, seed=None).to_dict()) == FaultPlan(rate=0.5, seed=None)


# -- two VMs on one Drive ---------------------------------------------------------------------------------------


def test_two_vms_see_each_others_changes_only_after_both_lags(drive_sim: MakeSim, tmp_path: Path) -> None:
    remote = tmp_path / "drive"
    a = drive_sim(remote, tmp_path / "vm-a", durability_lag_s=0.5, pull_lag_s=1.0, cache_s=0.0)
    b = drive_sim(remote, tmp_path / "vm-b", durability_lag_s=0.5, pull_lag_s=1.0, cache_s=0.0)
    (a.mountpoint / "jobs").mkdir()
    (a.mountpoint / "jobs" / "state.json").write_text("from a")
    written = time.monotonic()
    assert not (b.mountpoint / "jobs").exists()  # not yet on Drive, let alone on the other VM
    assert _wait_for(lambda: (b.mountpoint / "jobs" / "state.json").is_file())
    assert time.monotonic() - written >= 1.4, "the change reached the other VM before both lags had passed"
    assert (b.mountpoint / "jobs" / "state.json").read_text() == "from a"
    (b.mountpoint / "jobs" / "state.json").unlink()
    assert _wait_for(lambda: not (a.mountpoint / "jobs" / "state.json").exists())


def test_a_change_not_yet_uploaded_wins_until_then_and_the_last_upload_wins_after(
    drive_sim: MakeSim, tmp_path: Path
) -> None:
    remote = tmp_path / "drive"
    a = drive_sim(remote, tmp_path / "vm-a", durability_lag_s=0.2, pull_lag_s=0.2, cache_s=0.0)
    b = drive_sim(remote, tmp_path / "vm-b", durability_lag_s=3.0, pull_lag_s=0.2, cache_s=0.0)
    (a.mountpoint / "marker").write_text("a")
    (b.mountpoint / "marker").write_text("b")  # b's upload is slow: a's version reaches Drive first
    assert _wait_for(lambda: (remote / "marker").is_file() and (remote / "marker").read_text() == "a")
    time.sleep(0.6)
    assert (b.mountpoint / "marker").read_text() == "b", "a pending local change was overwritten by the pull"
    assert _wait_for(lambda: (a.mountpoint / "marker").read_text() == "b", timeout=15)  # b uploaded last
    assert (remote / "marker").read_text() == "b"


def test_exclusive_creates_on_two_vms_both_succeed(drive_sim: MakeSim, tmp_path: Path) -> None:
    """Drive has no cross-VM locks: O_EXCL is decided by each VM's own view. Claims rely on it only within one
    VM; across VMs the lease duration must outlast the propagation lag (docs/reliability.md)."""
    remote = tmp_path / "drive"
    a = drive_sim(remote, tmp_path / "vm-a", durability_lag_s=0.3, pull_lag_s=0.3, cache_s=0.0)
    b = drive_sim(remote, tmp_path / "vm-b", durability_lag_s=0.3, pull_lag_s=0.3, cache_s=0.0)
    created = []
    for sim in (a, b):
        descriptor = os.open(sim.mountpoint / "claim-g1", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(descriptor)
        created.append(sim.mountpoint.name)
    assert created == ["vm-a", "vm-b"]
