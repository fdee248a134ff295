"""specdm: synthetic labelled multispectral datasets with SpecDM."""

import os

# OpenMP threads spin between torch's parallel regions (libgomp: ~3 ms, for ever under an
# HPC site's OMP_WAIT_POLICY=ACTIVE); on a host whose cores other jobs hold, spinning threads
# fight them for the CPU: sleeping waits were the fastest there and 0.82x the best when idle
# (README, Threads; examples/bench_synthesize.py --only threads). They must be chosen before
# torch loads OpenMP, so here, before any module of ours imports torch; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
