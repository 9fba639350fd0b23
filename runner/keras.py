"""runner inside your own ``model.fit``: ``callbacks=[runner.keras.Checkpointing(job="name")]``.

Importing this module imports TensorFlow (``import runner`` alone does not). See docs/own_code.md.
"""

from runner.train.own_code.checkpointing import Checkpointing

__all__ = ["Checkpointing"]
