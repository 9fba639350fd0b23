"""The user's own Keras code made resumable: ``runner.fit``, the ``Checkpointing`` callback for their own
``model.fit``, the state of the callbacks they pass, and the job session both share.

They work with the user's own ``tf.data`` pipelines and Keras' TensorFlow trainer, so on another backend
(``KERAS_BACKEND=jax``) they are refused in one line here, before any of them imports TensorFlow.
"""

import keras

from runner.errors import UsageError

if keras.backend.backend() != "tensorflow":
    raise UsageError(
        f"runner.fit, runner.keras.Checkpointing and runner.data train your own code on Keras' TensorFlow backend, "
        f"and Keras runs on {keras.backend.backend()} here: set KERAS_BACKEND=tensorflow, or describe the job in a "
        "spec (runner.submit, then runner.work), which trains on JAX too"
    )
