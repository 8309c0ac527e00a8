"""Prepared checks of dist_train on one NVIDIA GPU: `python -m dist_train.gpu_check --help`.

Writes one JSON file of results; exit status 0 all pass, 1 a failure, 2 bad arguments, 3 no CUDA.
"""
