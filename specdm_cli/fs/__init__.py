"""The file-system leaf below stores, runs and stages: atomic writes, locks, digests, safe paths."""
