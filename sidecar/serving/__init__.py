"""`graysteer serve`: its options (each defined once), building a sidecar from them,
running it, and `--workers N`."""
