"""Processes: spawning workers, rendezvous, signals, watching peers, run-directory ownership."""
