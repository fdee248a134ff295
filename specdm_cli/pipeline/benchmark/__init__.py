"""benchmark: quality, memorisation, downstream utility and throughput of a synthetic store."""
