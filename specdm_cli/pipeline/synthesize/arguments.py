"""`specdm synthesize`'s usage errors that need no model: told before torch and diffusers load."""

from __future__ import annotations

from pathlib import Path

from specdm_cli.config import Task
from specdm_cli.errors import task_needed
from specdm_cli.pipeline.synthesize.preview import check_preview_path
from specdm_cli.pipeline.synthesize.shards import parse_batch_size, parse_shard
from specdm_cli.stores.target import refuse_stream_out


def refuse_at_once(
    model: str | None,
    task: Task | None,
    batch_size: str,
    shard: str | None,
    preview: Path | None,
    out: Path | None,
) -> None:
    """The usage errors that need no model, told before torch and diffusers load (~8 s on a
    busy machine); the pipeline checks them again for callers that skip the CLI."""
    if out is not None:  # `--out -` first, as every command tells it
        refuse_stream_out(out)
    if model in (None, "demo") and task is None:
        raise task_needed(model)
    parse_batch_size(batch_size)
    parse_shard(shard)
    if preview is not None:
        check_preview_path(preview, {"--out": out})
