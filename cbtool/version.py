"""The cbtool version, recorded in every checkpoint and code store (docs/formats.md)."""

__version__ = "0.1.0"
