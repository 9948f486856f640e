"""Deployment: exported detectors and ``aead predict``."""
