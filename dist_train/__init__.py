"""dist_train: config-driven data-parallel PyTorch training, from one CPU process to N workers."""

__version__ = "0.1.0"
