"""What a run leaves and shows: exports in final/, TensorBoard event files, the progress display."""
