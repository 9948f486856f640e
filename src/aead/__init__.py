"""aead: unsupervised visual defect detection with autoencoders, run as a DVC pipeline."""

__version__ = "0.1.0"
