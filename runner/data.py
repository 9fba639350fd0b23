"""runner's input pipeline for your own code: ``runner.data.image_folder(path, image_size, batch_size)``.

Its training batches come in an order that is a function of (seed, epoch) only, so a run that ``runner.fit`` (or
the ``Checkpointing`` callback) resumes part way through an epoch sees the batches an uninterrupted one would
have. Importing this module imports TensorFlow (``import runner`` alone does not). See docs/own_code.md.
"""

import runner.train.own_code  # noqa: F401 (refuses, in one line, a Keras backend other than TensorFlow)
from runner.train.data.own_code import ImageFolder, image_folder

__all__ = ["ImageFolder", "image_folder"]
