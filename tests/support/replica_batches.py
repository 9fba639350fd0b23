"""Print, as JSON, how the engine splits each global batch between the devices of ``training.distribute:
mirrored`` ($RUNNER_LOGICAL_CPUS logical CPUs): the example ids each device gets, batch by batch.

Usage: python -m tests.support.replica_batches EXAMPLES BATCH_SIZE
"""

from __future__ import annotations

import json
import sys

import tensorflow as tf

import runner.train  # noqa: F401 (splits the CPU into $RUNNER_LOGICAL_CPUS devices, before TensorFlow starts)
from runner.train.backends.devices import place


def main(examples: int, batch_size: int) -> None:
    placement, _ = place("mirrored", batch_size=batch_size)
    assert placement.strategy is not None, "one device: set RUNNER_LOGICAL_CPUS"
    batches = tf.data.Dataset.range(examples).batch(batch_size)
    split = []
    for batch in placement.distribute(batches):
        split.append([local.numpy().tolist() for local in placement.strategy.experimental_local_results(batch)])
    print(json.dumps({"devices": placement.replicas, "batches": split}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
