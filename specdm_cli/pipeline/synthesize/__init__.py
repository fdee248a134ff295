"""synthesize: sampling on the batch grid, shards and ranks, the writer, --require, previews."""
