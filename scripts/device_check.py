"""Check, on a machine with a real NVIDIA driver, what runner records about the session's device.

Runs the core (no TensorFlow needed: the counting trainer from the tests stands in for Keras) on a temporary
queue with real `runner work` processes, and prints JSON lines: the GPUs nvidia-smi reports, how long asking
took, the device recorded in the `claimed` event, state.json and `runner status --json`, and the status table.

    PYTHONPATH=. python scripts/device_check.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runner.device import describe_devices, detect_gpus, short_device  # noqa: E402


def emit(**record: object) -> None:
    print(json.dumps(record), flush=True)


def main() -> int:
    started = time.perf_counter()
    gpus = detect_gpus()
    emit(check="nvidia-smi", seconds=round(time.perf_counter() - started, 3), gpus=[gpu.__dict__ for gpu in gpus])
    emit(check="describe", device=describe_devices(gpus), short=short_device(describe_devices(gpus)))
    emit(check="tensorflow importable", value=subprocess.run([sys.executable, "-c", "import tensorflow"],
                                                             capture_output=True).returncode == 0)

    env = dict(os.environ, RUNNER_TRAINER="tests.support.counting_trainer:CountingTrainer")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as scratch:
        queue = Path(scratch) / "queue"
        for name in ("gpu-a", "gpu-b"):
            spec = Path(scratch) / f"{name}.json"
            spec.write_text(json.dumps({
                "name": name,
                "dataset": {"source": "/unused"},
                "model": {"builtin": "simple_cnn", "params": {"steps": 5}},
                "training": {"epochs": 3},
            }))
            subprocess.run([sys.executable, "-m", "runner", "submit", "--queue", str(queue), str(spec)], env=env, check=True)
        work_started = time.perf_counter()
        work = subprocess.run([sys.executable, "-m", "runner", "work", "--queue", str(queue)], env=env,
                              capture_output=True, text=True)
        emit(check="runner work", exit_code=work.returncode, seconds=round(time.perf_counter() - work_started, 2))
        print(work.stdout, flush=True)
        status = subprocess.run([sys.executable, "-m", "runner", "status", "--json", "--queue", str(queue)], env=env,
                                capture_output=True, text=True, check=True)
        for record in json.loads(status.stdout):
            state = json.loads((queue / "jobs" / record["name"] / "state.json").read_text())
            claimed = [
                json.loads(line) for line in (queue / "jobs" / record["name"] / "events.jsonl").read_text().splitlines()
                if '"claimed"' in line
            ]
            emit(check="job", name=record["name"], state=record["state"], status_device=record["device"],
                 state_device=state["device"], claimed_devices=[event.get("device") for event in claimed])
    return 0


if __name__ == "__main__":
    sys.exit(main())
