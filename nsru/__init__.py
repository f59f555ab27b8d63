"""NSRU: null-space constrained, response-specified unlearning for large language models."""

from nsru import ops

__version__ = "0.1.0"

__all__ = ["ops"]
