"""Provoke a real out-of-GPU-memory error and check that ``training.on_oom: halve_batch`` recovers from it.

For a machine with one NVIDIA GPU of about 80 GB (an H100). It submits one job to a temporary queue: a stack of
wide 3x3 convolutions at full resolution (no pooling until the end) on 256x256 digits from the bundled archive
(runner/datasets/digits.tar.gz), with a batch whose convolution outputs alone need about 97 GB. It runs
`runner work` on it and prints JSON lines: the plan, each ``oom`` event, the job's final status, and a verdict.
Expected: 320 -> 160 (maybe -> 80), then one epoch done, in about two minutes. Nothing is downloaded.

Each convolution's output stays below 2**31 elements at the first batch size, so the GPU fails on memory, not on
a kernel's index limit; cuDNN convolutions are not recomputed by XLA, so their outputs must all be kept for the
backward pass and cannot be squeezed under the GPU's memory.

    python scripts/gpu_oom_check.py             # on the GPU machine
    python scripts/gpu_oom_check.py --dry-run   # anywhere: tiny sizes on the CPU, a stand-in memory limit

Exit status 0 when the job ran out of memory, halved its batch size and finished; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DIGITS_ARCHIVE = REPO / "runner" / "datasets" / "digits.tar.gz"
JOB = "gpu-oom-check"

REAL = {"image_size": 256, "filters": 96, "layers": 12, "batch_size": 320, "per_class": 64, "stand_in_max_batch": None}
"""On an 80 GB GPU: 12 conv outputs of 320x256x256x96 float32 are 8 GB each, 97 GB in all."""

DRY_RUN = {"image_size": 16, "filters": 4, "layers": 2, "batch_size": 64, "per_class": 16, "stand_in_max_batch": 10}
"""On the CPU: the test stand-in (tests/support/oom_model.py) fails batches of more than 10: 64 -> 32 -> 16 -> 8."""


def wide_conv_model(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    filters: int,
    layers: int,
    stand_in_max_batch: int | None = None,
) -> Any:
    """The job's model factory: ``layers`` 3x3 convolutions of ``filters`` channels at full resolution, then global
    pooling. ``stand_in_max_batch`` puts the tests' memory-limit stand-in in front (for a dry run without a GPU)."""
    import keras

    inputs = keras.Input(shape=input_shape)
    x = inputs
    if stand_in_max_batch is not None:
        from tests.support.oom_model import MemoryLimit

        x = MemoryLimit(stand_in_max_batch)(x)
    x = keras.layers.Rescaling(1.0 / 255)(x)
    for _ in range(layers):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def extract_digits(target: Path, *, per_class: int) -> Path:
    """The first ``per_class`` training and ``per_class // 4`` validation images of each digit, as class folders."""
    limits = {"train": per_class, "validation": max(1, per_class // 4)}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(DIGITS_ARCHIVE) as archive:
        for member in archive:
            parts = Path(member.name).parts  # digits/<split>/<label>/<n>.png
            if len(parts) != 4 or parts[1] not in limits or not member.isfile():
                continue
            key = (parts[1], parts[2])
            if counts.get(key, 0) >= limits[parts[1]]:
                continue
            counts[key] = counts.get(key, 0) + 1
            source = archive.extractfile(member)
            assert source is not None
            path = target / parts[1] / parts[2] / parts[3]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(source.read())
    return target


def job_spec(data: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """The job: one epoch, halving the batch size on each out-of-memory error."""
    params = {"filters": sizes["filters"], "layers": sizes["layers"]}
    if sizes["stand_in_max_batch"] is not None:
        params["stand_in_max_batch"] = sizes["stand_in_max_batch"]
    return {
        "name": JOB,
        "dataset": {
            "source": str(data),
            "train": "train",
            "validation": "validation",
            "image_size": [sizes["image_size"]] * 2,
            "color_mode": "grayscale",
            "label_mode": "int",
            "batch_size": sizes["batch_size"],
        },
        "model": {"factory": f"{Path(__file__).stem}:wide_conv_model", "params": params},
        "training": {
            "epochs": 1,
            "learning_rate": 0.001,
            "loss": "sparse_categorical_crossentropy",
            "metrics": ["accuracy"],
            "on_oom": "halve_batch",
        },
        "checkpoint": {"every_epochs": 1, "keep": 1},
    }


def runner_env(folder: Path, *, dry_run: bool) -> dict[str, str]:
    """`runner` with its default Keras trainer, a private cache, and this script importable as the factory."""
    env = {key: value for key, value in os.environ.items() if key not in ("RUNNER_QUEUE", "RUNNER_TRAINER")}
    path = [str(Path(__file__).resolve().parent), str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    env["RUNNER_CACHE"] = str(folder / "cache")
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def runner(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def check(folder: Path, sizes: dict[str, Any], *, dry_run: bool, timeout: float) -> bool:
    data = extract_digits(folder / "digits", per_class=sizes["per_class"])
    spec = folder / f"{JOB}.json"
    spec.write_text(json.dumps(job_spec(data, sizes), indent=1))
    queue, env = folder / "queue", runner_env(folder, dry_run=dry_run)
    conv_bytes = sizes["layers"] * sizes["batch_size"] * sizes["image_size"] ** 2 * sizes["filters"] * 4
    emit({"plan": {**sizes, "conv_outputs_gb": round(conv_bytes / 1e9, 1), "dry_run": dry_run, "queue": str(queue)}})

    submitted = runner("submit", str(spec), "--queue", str(queue), env=env, timeout=120)
    if submitted.returncode != 0:
        emit({"verdict": "failed", "why": "submit failed", "stderr": submitted.stderr.strip()})
        return False
    started = time.monotonic()
    worked = runner("work", "--queue", str(queue), env=env, timeout=timeout)
    seconds = round(time.monotonic() - started, 1)

    ooms = []
    for line in (queue / "jobs" / JOB / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "oom":
            ooms.append(event)
            emit({"oom": event})
    status = json.loads(runner("status", "--queue", str(queue), "--json", env=env, timeout=120).stdout)[0]
    emit({"status": status})
    done = worked.returncode == 0 and status["state"] == "done"
    halved = bool(ooms) and status["batch_size"] == ooms[-1]["batch_size_to"] < sizes["batch_size"]
    why = "ran out of memory, halved, finished" if done and halved else ("no oom event" if not ooms else "not done")
    passed = done and halved
    emit({"verdict": "ok" if passed else "failed", "why": why, "exit_code": worked.returncode, "seconds": seconds})
    if not passed:
        emit({"work_stderr_tail": worked.stderr[-4000:]})
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU with a stand-in memory limit")
    parser.add_argument("--batch-size", type=int, help="the spec's batch size (default: 320; 64 for a dry run)")
    parser.add_argument("--layers", type=int, help="convolutions: more need more memory at the same batch (default 12)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary queue folder for a look afterwards")
    parser.add_argument("--timeout", type=float, default=540, help="seconds `runner work` may take (default 540)")
    args = parser.parse_args(argv)
    sizes = dict(DRY_RUN if args.dry_run else REAL)
    for name in ("batch_size", "layers"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    folder = Path(tempfile.mkdtemp(prefix="runner-oom-check-"))
    try:
        return 0 if check(folder, sizes, dry_run=args.dry_run, timeout=args.timeout) else 1
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
