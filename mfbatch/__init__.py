"""mfbatch: nightly top-K for every user from a matrix-factorization model."""

__version__ = "0.1.0"
