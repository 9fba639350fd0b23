"""What the engine asks of its backend (TensorFlow today): devices, determinism, out-of-memory errors."""
