"""What a run reports while it runs: metric records, the console, experiment trackers."""
