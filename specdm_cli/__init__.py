"""specdm: synthetic labelled multispectral datasets with SpecDM."""

import os

# torch's OpenMP threads spin between parallel regions by default; on a host whose cores other
# jobs hold, spinning threads fight them for the CPU (30x slower sampling measured by
# examples/bench_synthesize.py --only threads). Sleeping waits must be chosen before torch
# loads OpenMP, so here, before any module of ours imports torch; a user's own value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
