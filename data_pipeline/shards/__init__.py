"""The shard format both sides share: tar shards, their indexes and `manifest.json`.

Written by `data_pipeline.prepare`, read by `data_pipeline.read`; depends on nothing above it.
"""
