"""The training state on local disk, the thread that publishes it, and room for checkpoints."""
