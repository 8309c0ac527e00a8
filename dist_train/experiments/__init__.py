"""Several runs and what is drawn from them: sweeps, their results table, reports."""
