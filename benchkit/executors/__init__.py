"""Executors run the (cell, shard) tasks of a suite; only the driver writes the store."""
