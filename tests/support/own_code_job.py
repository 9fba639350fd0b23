"""The tutorial's script, in the three ways docs/own_code.md makes it resumable, as a real process to kill.

    python -m tests.support.own_code_job QUEUE JOB DATA WAY EPOCHS [EVERY_MINUTES]

``WAY`` is ``fit`` (``runner.fit`` on ``image_dataset_from_directory``'s seeded, shuffled datasets), ``runner-data``
(``runner.fit`` on ``runner.data.image_folder``, checkpointing part way through epochs) or ``callback`` (the
user's own ``model.fit`` with ``runner.keras.Checkpointing``). A Sequential CNN with Dropout, Adam, accuracy, and
the callbacks people pass: EarlyStopping, ReduceLROnPlateau, CSVLogger (its file beside the queue).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(queue: str, job: str, data: str, way: str, epochs: str, every_minutes: str | None = None) -> None:
    import keras
    import tensorflow as tf

    import runner

    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    size, batch = (32, 32), 4
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_accuracy", factor=0.5, patience=2),
        keras.callbacks.CSVLogger(str(_beside(queue, f"{job}.csv"))),
    ]
    model = keras.Sequential(
        [
            keras.Input((*size, 1)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    minutes = float(every_minutes) if every_minutes else None
    if way == "runner-data":
        folder = runner.data.image_folder(
            data, image_size=size, batch_size=batch, validation="validation", label_mode="int", color_mode="grayscale"
        )
        runner.fit(
            model,
            folder,
            epochs=int(epochs),
            job=job,
            queue=queue,
            callbacks=callbacks,
            every_minutes=minutes,
            verbose=2,
        )
        return
    options = {"image_size": size, "batch_size": batch, "color_mode": "grayscale", "label_mode": "int", "seed": 7}
    train = keras.utils.image_dataset_from_directory(Path(data) / "train", shuffle=True, **options)
    validation = keras.utils.image_dataset_from_directory(Path(data) / "validation", shuffle=False, **options)
    if way == "fit":
        runner.fit(
            model,
            train,
            validation_data=validation,
            epochs=int(epochs),
            job=job,
            queue=queue,
            callbacks=callbacks,
            verbose=2,
        )
    elif way == "callback":
        checkpointing = runner.keras.Checkpointing(job=job, queue=queue)
        model.fit(
            train, validation_data=validation, epochs=int(epochs), callbacks=[*callbacks, checkpointing], verbose=2
        )
    else:
        raise SystemExit(f"unknown way {way!r}")


def _beside(queue: str, name: str) -> Path:
    folder = Path(queue).parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


if __name__ == "__main__":
    main(*sys.argv[1:])
