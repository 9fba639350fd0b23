"""Load a job's checkpoint into the job's model on the Keras backend this process runs (``$KERAS_BACKEND``) and
print, as JSON, which of the checkpoint's arrays the model's variables do not hold exactly afterwards.

Usage: python -m tests.support.restore_elsewhere JOB_FOLDER CHECKPOINT_FOLDER SCRATCH_FOLDER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np

import runner.train  # noqa: F401 (the engine's start: devices, quiet TensorFlow)
from runner.job import Job
from runner.paths import JobPaths
from runner.train.engine.steps import build_metrics
from runner.train.models.build import build_model, compile_model
from runner.train.snapshots.snapshot import VARIABLES_FILE, capture_snapshot, load_snapshot


def main(job_folder: Path, checkpoint: Path, scratch: Path) -> None:
    spec = Job(JobPaths(job_folder)).read_spec()
    channels = 1 if spec.dataset.color_mode == "grayscale" else 3
    model = build_model(spec, input_shape=(*spec.dataset.image_size, channels), num_classes=3, pretrained=False)
    compile_model(model, spec)
    model.optimizer.build(model.trainable_variables)
    image = keras.KerasTensor((None, *spec.dataset.image_size, channels), "float32")
    build_metrics(model, (image, keras.KerasTensor((None,), "int32")))
    state = load_snapshot(model, checkpoint, checkpoint=checkpoint.name)
    capture_snapshot(model, state).write(scratch)  # what this backend's next checkpoint would hold
    with np.load(scratch / VARIABLES_FILE) as arrays:
        restored = {name: arrays[name] for name in arrays.files}
    with np.load(checkpoint / VARIABLES_FILE) as arrays:
        differ = [name for name in arrays.files if not np.array_equal(arrays[name], restored.get(name))]
        compared = len(arrays.files)
    print(json.dumps({"backend": keras.backend.backend(), "compared": compared, "differ": differ}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
