"""Ray job entrypoints (``ray job submit -- python -m mmbalance.jobs.rebalance ...``)."""
