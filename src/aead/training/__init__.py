"""Training: the loops, checkpoints, data-parallel runs and the numerics that make them reproducible."""
