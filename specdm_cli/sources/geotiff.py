"""Reader for the geotiff source (being written)."""
