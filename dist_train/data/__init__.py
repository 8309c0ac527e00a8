"""Datasets, the world-size-invariant sampler, loading, tokens and `dist-train prepare`."""
