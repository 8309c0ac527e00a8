"""Checkpoints: `checkpointer` saves and loads (the only module importing DCP's save path),
`files` reads folders and manifests (DCP only when it must), `export` consolidates shards.

Kept empty so that `dist-train check` can read manifests without importing DCP.
"""
