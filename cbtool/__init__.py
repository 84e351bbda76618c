"""cbtool: train, store, search and steer codebook features (arXiv 2310.17230)."""

__version__ = "0.1.0"
