"""Training: the config and presets, the trainer, starting and resuming a run, k-means, DDP and the metrics log
(docs/train.md)."""
