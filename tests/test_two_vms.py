"""Two VMs on one simulated Drive, both running `runner work` on one queue (tests/two_vms.py).

The full grid (lags, lease durations, stalls) runs with `python tests/two_vms.py` and is reported in
docs/reliability.md; here one run where both VMs start together, so that they claim the same jobs within the lag.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.drivesim.fixtures import requires_fuse
from tests.support.hosts_cluster import uts_namespaces_work
from tests.two_vms import Setup, run

pytestmark = [
    pytest.mark.slow,
    requires_fuse,
    pytest.mark.skipif(not uts_namespaces_work(), reason="needs `unshare --uts` (two host names)"),
]


def test_two_vms_that_claim_together_are_sorted_out_by_the_claim_marker_and_finish_each_job_once(
    tmp_path: Path,
) -> None:
    result = run(Setup(push_lag_s=0.5, pull_lag_s=0.5, lease_s=6.0, jobs=2, epochs=4), tmp_path)
    row = result.row()
    explain = f"{row}; output: {result.output}"
    assert row["all_done"] and row["results_ok"], explain
    assert row["collisions"] >= 1, f"the VMs never claimed a job at the same time: the test proved nothing; {explain}"
    assert row["fenced"] >= 1, f"a claim of the same generation on the other VM was never fenced; {explain}"
    assert row["finished_twice"] == [], explain
    assert row["fenced_restores"] == [], explain
