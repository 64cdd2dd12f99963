"""Metrics: the one JSON-lines writer (rank 0; wandb an optional sink), collective bytes and per-rank stats."""
