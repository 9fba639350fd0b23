"""The dataset: the local cache, downloads, archives, image folders, and the (seed, epoch) input pipeline."""
