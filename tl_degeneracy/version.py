"""The package version (read by the command line without importing the package's heavy parts)."""
__version__ = "0.3.0"
