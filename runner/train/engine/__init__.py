"""The compiled training loop, its speed options (mixed precision, XLA), and running out of memory."""
