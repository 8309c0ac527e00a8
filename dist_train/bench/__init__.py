"""`dist-train bench NAME`: contenders timed side by side, reported as medians and ratios.
The list of benchmarks is `registry.py`."""
