"""specdm: synthetic labelled multispectral datasets with SpecDM."""

import os

# OpenMP threads spin between torch's parallel regions (libgomp: ~3 ms, for ever under an
# HPC site's OMP_WAIT_POLICY=ACTIVE); on a host whose cores other jobs hold, spinning threads
# fight them for the CPU: sleeping waits were the fastest there and 0.82x the best when idle
# (README, Threads; examples/bench_synthesize.py --only threads). They must be chosen before
# torch loads OpenMP, so here, before any module of ours imports torch; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# GDAL's block cache defaults to 5% of RAM and each `prepare` worker thread fills it through
# its own handles: a 4000 x 4000 10-band scene peaked at 1.39 GB RSS, 0.70 GB with 256 MB
# (2026-12-06; a patch row of a Sentinel-2 tile is ~56 MB, so overlapping windows still hit).
# GDAL reads it when its cache first fills, after this import; a user's value wins.
os.environ.setdefault("GDAL_CACHEMAX", "256")

__version__ = "0.1.0"
