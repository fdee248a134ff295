"""`specdm benchmark`: how good, how useful and how fast a synthetic dataset is."""
