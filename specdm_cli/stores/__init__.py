"""Samples <-> disk: Zarr and GeoTIFF stores, their lifecycle (create, resume, overwrite) and locks.

Callers import from here; the names live in `open` (open and create a store), `damage`
(layout check, verify, rewrite damaged samples), `ownership` (what --overwrite may remove),
`digests` (a store's sha256s) and `target` (an output path: fresh, resume or done).
"""

from __future__ import annotations

from specdm_cli.stores.base import SampleMeta, StoreReader, StoreWriter
from specdm_cli.stores.damage import check_layout, find_damaged, forget_damaged, verify_store
from specdm_cli.stores.digests import content_sha256, store_sha256
from specdm_cli.stores.open import create_store, incomplete_store, open_store, open_writer
from specdm_cli.stores.ownership import (
    OutputKind,
    is_ours,
    refuse_overwrite_of_others,
    remove_own,
)
from specdm_cli.stores.target import (
    TargetState,
    default_store_path,
    plan_differences,
    refuse_stream_out,
    resolve_target,
    stored_sample_bytes,
)

__all__ = [
    "OutputKind",
    "SampleMeta",
    "StoreReader",
    "StoreWriter",
    "TargetState",
    "check_layout",
    "content_sha256",
    "create_store",
    "default_store_path",
    "find_damaged",
    "forget_damaged",
    "incomplete_store",
    "is_ours",
    "open_store",
    "open_writer",
    "plan_differences",
    "refuse_overwrite_of_others",
    "refuse_stream_out",
    "remove_own",
    "resolve_target",
    "store_sha256",
    "stored_sample_bytes",
    "verify_store",
]
