"""Where bytes live: local paths, S3, HTTP(S) and fsspec backends, and the per-node shard cache.

Knows nothing of shards' contents, batches or training.
"""
