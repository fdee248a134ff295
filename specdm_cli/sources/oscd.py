"""Reader for the oscd source (being written)."""
