"""Reader for the segmunich source (being written)."""
