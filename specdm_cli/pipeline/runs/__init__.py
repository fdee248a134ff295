"""Run directories: run.json, checkpoints, the run registry, choosing the model to sample."""
