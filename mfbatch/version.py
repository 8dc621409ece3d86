"""The package version, in one place every module may import without importing the API."""

__version__ = "0.1.0"
