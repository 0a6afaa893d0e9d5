"""Shard format and (later) the training data pipeline."""
