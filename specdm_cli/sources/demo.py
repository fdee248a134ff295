"""Reader for the demo source (being written)."""
